"""Chaos scenarios: faults injected into a running cluster while Locust drives load.

    scenarios  what each scenario does (a list of timed fault steps) and the steps
    runner     one scenario end to end: cluster up, load, faults, drain, final states,
               the reconciliation report (loadtest.report), cluster down
    __main__   ``python -m loadtest.chaos`` (``scripts/chaos``)

Every scenario is bounded in time and leaves nothing running behind it.
"""
