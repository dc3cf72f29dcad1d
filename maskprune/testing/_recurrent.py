"""Tiny recurrent models: ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` (layers, directions, ``proj_size``,
``batch_first``, packed sequences, an initial state) and their cells run in a loop."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class TinyConvLSTM(nn.Module):
    """A convolutional front end into an LSTM, a linear head on the last step: ``(batch, channels, time)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.lstm = nn.LSTM(8, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = self.conv(x).relu().permute(2, 0, 1)  # (time, batch, channels)
        out, _ = self.lstm(steps)
        return self.head(out[-1])


class TinyRecurrent(nn.Module):
    """``inp`` (a linear layer) -> ``rnn`` -> ``head`` (a linear layer) on every step, summed over time.

    ``packed=True`` runs ``rnn`` on a packed sequence of unequal lengths; ``initial=True`` gives it an initial
    state computed from the input, non-zero in every channel: ``h0 = tanh(init(x)) + 1`` (an LSTM's ``c0`` the
    same by ``init_cell``).
    """

    def __init__(self, rnn: nn.RNNBase, packed: bool = False, initial: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(5, rnn.input_size)
        self.rnn = rnn
        self.packed, self.initial = packed, initial
        directions = 2 if rnn.bidirectional else 1
        self.head = nn.Linear(directions * (rnn.proj_size or rnn.hidden_size), 4)
        self.init = nn.Linear(5, rnn.proj_size or rnn.hidden_size) if initial else None
        self.init_cell = nn.Linear(5, rnn.hidden_size) if initial and isinstance(rnn, nn.LSTM) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = self.inp(x)
        time = 1 if self.rnn.batch_first else 0
        if self.packed:
            lengths = torch.arange(x.shape[1], 0, -1).clamp(max=x.shape[0]).flip(0)  # unsorted, all > 0
            out, _ = self.rnn(pack_padded_sequence(steps, lengths, enforce_sorted=False))
            out, _ = pad_packed_sequence(out, total_length=x.shape[0])
        elif self.init is not None:
            layers = self.rnn.num_layers * (2 if self.rnn.bidirectional else 1)
            h0, c0 = [
                None if init is None else (torch.tanh(init(x.mean(time))) + 1).expand(layers, -1, -1).contiguous()
                for init in (self.init, self.init_cell)
            ]
            out, _ = self.rnn(steps, h0 if c0 is None else (h0, c0))
        else:
            out, _ = self.rnn(steps)
        return self.head(out).sum(time)


class TinyCellLoop(nn.Module):
    """``inp`` -> a recurrent cell run step by step over ``(time, batch, features)`` -> ``head`` on the sum of
    its hidden states."""

    def __init__(self, cell: nn.RNNCellBase) -> None:
        super().__init__()
        self.inp = nn.Linear(5, cell.input_size)
        self.cell = cell
        self.head = nn.Linear(cell.hidden_size, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps, state, total = self.inp(x), None, 0
        for t in range(steps.shape[0]):
            state = self.cell(steps[t], state)
            total = total + (state[0] if isinstance(state, tuple) else state)
        return self.head(total)
