"""Comparison tolerances per dtype: one table for every test.

Every backend keeps its state in fp32 (fp64 for fp64) and rounds each output once to the
output dtype, as the reference does; two such results differ by at most about one unit in
the last place (ulp) of the output dtype plus fp32 reassociation noise. The table allows
two ulps: fp16 has 11 significant bits (ulp <= 2**-10), bf16 8 (ulp <= 2**-7). fp32
allows for the scan's reassociation over thousands of steps; fp64 for none of it.
"""
import torch

TOLERANCES = {  # dtype: (rtol, atol)
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2 * 2.0**-10, 2 * 2.0**-10),
    torch.bfloat16: (2 * 2.0**-7, 2 * 2.0**-7),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Compare in fp64 with the tolerance of `dtype` (the dtype the computation ran in)."""
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


def assert_all_close(actual: dict, expected: dict, dtype: torch.dtype, check_dtypes: bool = True) -> None:
    """assert_close for every named result of two runs (the same names), and the same dtypes."""
    assert actual.keys() == expected.keys()
    for name in expected:
        if check_dtypes:
            assert actual[name].dtype == expected[name].dtype, name
        assert_close(actual[name], expected[name], dtype, name)
