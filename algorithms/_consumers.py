"""Where a group's channels are read: each consumer layer's weight slice paired with the input it reads."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from maskprune import ActivationSite, Group, Mask, Member

from ._moments import Moments, site_key


@dataclass
class Reader:
    """One consumer layer of a group: its weight member (the input dimension) and the input it reads, at
    every call of the layer in a forward (a layer shared by several blocks runs once per block)."""

    module: nn.Module
    path: str
    member: Member
    sites: list[ActivationSite]

    def statistics(self, moments: dict[tuple, Moments]) -> Moments:
        """The statistics of the layer's input over every call."""
        return Moments.merged([moments[site_key(s)] for s in self.sites])

    def column_sums(self, power: int) -> torch.Tensor:
        """Per position of the input dim: the sum of ``|w| ** power`` over the rest of the weight (float64)."""
        w = self.member.tensor.detach().movedim(self.member.dim, 0)
        rows = w.reshape(w.shape[0], -1).split(1024)  # float64 a slice at a time, not a copy of the weight
        return torch.cat([r.double().abs().pow(power).sum(1) for r in rows])


def consumer_input_sites(mask: Mask, group: Group) -> list[ActivationSite]:
    """The inputs of the leaf modules whose weights read the group's channels (role ``consumer``)."""
    consumers = {id(mask.model.get_submodule(m.module)) for m in group.members if m.role == "consumer"}
    return [s for s in group.activations("input") if id(s.module) in consumers]


def readers(mask: Mask, group: Group) -> tuple[list[Reader], list[str]]:
    """Every consumer weight of ``group`` paired with the input site of its layer that carries the same
    channels at the same positions (a linear layer's input features, a convolution's input channels);
    and the consumers that could not be paired (a functional call, a grouped convolution), by name."""
    sites = consumer_input_sites(mask, group)
    paired, unpaired = [], []
    for member in group.members:
        if member.role != "consumer":
            continue
        module = mask.model.get_submodule(member.module)
        calls = [s for s in sites if s.module is module and _same_channels(s, member)]
        if not calls or member.name.rpartition(".")[2] != "weight":
            unpaired.append(member.name)
        else:
            paired.append(Reader(module, member.module, member, calls))
    return paired, unpaired


@dataclass
class ReaderPlan:
    """What WandaSP and FLAP measure for a group: the input of every consumer layer."""

    readers: list[Reader]

    @property
    def sites(self) -> list[ActivationSite]:
        return [site for r in self.readers for site in r.sites]


def reader_plan(mask: Mask, group: Group) -> ReaderPlan | str:
    """Every consumer of ``group`` with its input, or why the group cannot be measured so."""
    paired, unpaired = readers(mask, group)
    if unpaired:
        return f"no input to pair with {', '.join(unpaired)}"
    if not paired:
        return "no layer reads its channels"
    return ReaderPlan(paired)


def covers(sites: list[ActivationSite], size: int) -> bool:
    """Whether every channel of a group of ``size`` appears at one of ``sites`` at least."""
    seen = np.zeros(size, dtype=bool)
    for site in sites:
        seen[site.units] = True
    return bool(seen.all())


def _same_channels(site: ActivationSite, member: Member) -> bool:
    if len(site.positions) != len(member.positions):
        return False
    if member.name.rpartition(".")[2] != "weight":  # by name: under FSDP2 the member holds a gathered copy
        return False
    a, b = np.argsort(site.positions), np.argsort(member.positions)
    return np.array_equal(site.positions[a], member.positions[b]) and np.array_equal(site.units[a], member.units[b])
