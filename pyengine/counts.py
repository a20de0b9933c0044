"""StepCounts: each parameter's optimizer step count, as torch.optim keeps it (per parameter),
held in as few device counters as the parameters' histories allow.

Note [cohorts]: torch.optim counts steps per parameter, and a parameter that gets no gradient
(unused, or frozen with requires_grad_(False)) is skipped, its count left as it was; Adam's
bias correction then differs from its neighbours' once it trains again. The fused passes run
over contiguous ranges and read one counter each, so parameters with the same history share
one counter: a cohort. At first a cohort is a param group. When a step skips some members of
a cohort while it updates others, the skipped ones move to a new cohort whose counter starts
as a device copy of the old one (no host sync); a cohort only ever splits, so there are at
most as many cohorts as parameters. The step plan runs one pass per contiguous run of one
cohort, and the last pass of a cohort advances its counter.

Counters are int64 on the device (exact for any run); SGD uses its count only to know a
momentum buffer's first step, so a cohort whose buffer is born late (momentum set after the
Engine was built) restarts its count at 0 then.
"""
from typing import Dict, Iterable, List, Sequence

import torch

STEP_DTYPE = torch.int64  # the core's step counter type (see core.h OptimizerArgs::step)


class StepCounts:
    def __init__(self, group_of: Sequence[int], n_groups: int, device):
        self.group_of = list(group_of)
        n = len(self.group_of)
        self.cohort: List[int] = list(self.group_of)  # counter index of each parameter
        self.counters = torch.zeros(n_groups + n, dtype=STEP_DTYPE, device=device)
        self.cohort_group: List[int] = list(range(n_groups))  # param group of each cohort in use
        self.born = [False] * n_groups  # SGD: the cohort's momentum buffers exist
        self.version = 0  # changes with every split or reload: the plan's passes depend on it

    @property
    def n_cohorts(self) -> int:
        return len(self.cohort_group)

    def counter_ptr(self, c: int) -> int:
        return self.counters.data_ptr() + c * self.counters.element_size()

    def _new_cohort(self, like: int) -> int:
        c = len(self.cohort_group)
        self.cohort_group.append(self.cohort_group[like])
        self.born.append(self.born[like])
        self.counters[c:c + 1].copy_(self.counters[like:like + 1])  # on the device: no sync
        return c

    def split(self, skipped: Iterable[int], updated_cohorts: Iterable[int]):
        """The parameters `skipped` are left out of a step that updates `updated_cohorts`:
        each of them that shares a cohort with an updated parameter moves to a new cohort
        (one per old cohort), which keeps the count they have now."""
        updated = set(updated_cohorts)
        moved: Dict[int, int] = {}
        for i in skipped:
            c = self.cohort[i]
            if c in updated:
                if c not in moved:
                    moved[c] = self._new_cohort(c)
                self.cohort[i] = moved[c]
        if moved:
            self.version += 1

    def restart(self, group: int):
        """SGD: momentum buffers are born for `group` now; their first step comes next."""
        for c, g in enumerate(self.cohort_group):
            if g == group and not self.born[c]:
                self.counters[c:c + 1].zero_()
                self.born[c] = True

    def mark_born(self, group: int):
        for c, g in enumerate(self.cohort_group):
            if g == group:
                self.born[c] = True

    # -- per-parameter views (checkpoints, torch.optim's state_dict) ------------------------------
    def per_param(self) -> torch.Tensor:
        """Each parameter's step count (a device gather, read by the caller)."""
        index = torch.tensor(self.cohort, dtype=torch.long, device=self.counters.device)
        return self.counters.index_select(0, index)

    def load_per_param(self, steps: Sequence[int]):
        """Cohorts from saved per-parameter counts: parameters of one group with one count
        share a counter."""
        if len(steps) != len(self.group_of):
            raise ValueError(f"step counts for {len(steps)} parameters, the engine has {len(self.group_of)}")
        key_of: Dict[tuple, int] = {}
        values: List[int] = []
        groups: List[int] = []
        cohort = []
        for g, s in zip(self.group_of, steps):
            key = (g, int(s))
            if key not in key_of:
                key_of[key] = len(values)
                values.append(int(s))
                groups.append(g)
            cohort.append(key_of[key])
        n_groups = max(self.group_of, default=-1) + 1
        # every group keeps a cohort of its own index, so a group with no parameter counts too
        self.cohort_group = groups
        self.cohort = cohort
        self.born = [False] * len(groups)  # the caller marks the groups whose buffers it loaded
        counters = torch.zeros(max(len(values), n_groups) + len(self.group_of), dtype=STEP_DTYPE)
        counters[:len(values)] = torch.tensor(values, dtype=STEP_DTYPE)
        self.counters = counters.to(self.counters.device)
        self.version += 1

    def load_per_group(self, steps: Sequence[int]):
        """Older checkpoints: one count per param group."""
        self.load_per_param([int(steps[g]) for g in self.group_of])
