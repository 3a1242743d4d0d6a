"""Commands added by later parts of the project (plot, demo, bench)."""


def register(sub) -> None:
    return None
