"""GRU suite: rnnkern.nn.GRU against torch.nn.GRU (see recurrent.py for what is timed)."""
from benchmarks.suites import recurrent
from benchmarks.timing import Settings

SECTION, COLUMNS, LEGEND = recurrent.SECTION, recurrent.COLUMNS, recurrent.LEGEND


def run(settings: Settings) -> list[dict]:
    return recurrent.run_suite("gru", settings)
