"""Shared by the fuzz test modules: the fraction of examples that reach the oracle comparison."""


def assert_most_reach(reached: dict, floor: float) -> None:
    """``reached``: test name -> one bool per example (True: the example got past the argument
    checks to the comparison).  Examples are derandomized, so each fraction is fixed."""
    for name, hits in reached.items():
        frac = sum(hits) / len(hits)
        print(f"{name}: {sum(hits)} of {len(hits)} examples reach the reference ({frac:.0%})")
        assert frac >= floor, (name, sum(hits), len(hits))
