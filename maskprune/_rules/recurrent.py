"""Rules of recurrent ops: ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` (``lstm``, ``gru``, ``rnn_tanh``, ``rnn_relu``,
packed or not), their cells (``lstm_cell``, ``gru_cell``, ``rnn_tanh_cell``, ``rnn_relu_cell``) and packed sequences
(``_pack_padded_sequence``, ``_pad_packed_sequence``), with the size updaters of the recurrent layers.

A unit of a recurrent layer is one hidden channel ``i``: its row in every gate of ``weight_ih`` and ``weight_hh``
(row ``g * hidden_size + i`` of gate ``g``) and of the biases, its column of ``weight_hh`` (or of ``weight_hr``
with ``proj_size``), channel ``i`` of the initial and final states. All layers and both directions of one
``nn.LSTM`` share one ``hidden_size`` attribute, so hidden channel ``i`` of every layer and direction is one
unit: each keeps the same count, as the module requires. The output of a layer concatenates its directions:
channel ``d * hidden + i`` goes with unit ``i``, in the output and in the next layer's ``weight_ih`` columns.

With ``proj_size`` the hidden state (what ``weight_hh``, the next layer and the output read) is the projection
output: its channel ``j`` (row ``j`` of ``weight_hr``, column ``j`` of ``weight_hh``) is a unit of a second
space, of ``proj_size`` channels, shared the same way; the cell state keeps ``hidden_size`` channels, the
columns of ``weight_hr``.

A removed unit's gate rows and biases are zero and the kept units read none of its columns, so the kept
channels compute what the export computes whatever the removed channels carry (a non-zero initial state
included); the consumers of the output zero the removed channels' columns as for any producer.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from maskprune._layers import updater

from ._core import BIAS, CONSUMER, PRODUCER, OpCall, rule

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


@rule("lstm", "gru", "rnn_tanh", "rnn_relu")
def recurrent(call: OpCall) -> None:
    """A (multi-layer, maybe bidirectional, maybe projected) recurrent layer, on a padded or packed input.

    Arguments as ``nn.RNNBase`` passes them: ``(input, hx, weights, has_biases, num_layers, dropout, train,
    bidirectional, batch_first)``, or for a packed sequence ``(data, batch_sizes, hx, weights, ...)`` without
    ``batch_first``; ``hx`` is ``(h, c)`` for ``lstm``.
    """
    args = call.args
    if len(args) < 9:  # nine positional arguments either way
        return
    packed = isinstance(args[1], torch.Tensor) and args[1].dim() == 1
    shift = int(packed)
    x, hx, weights = args[0], args[1 + shift], list(args[2 + shift])
    has_biases, layers, bidirectional = bool(args[3 + shift]), int(args[4 + shift]), bool(args[7 + shift])
    states = list(hx) if call.name == "lstm" else [hx]
    directions = 2 if bidirectional else 1
    gates = GATES[call.name]
    per_direction, extra = divmod(len(weights), layers * directions)
    projected = per_direction - (4 if has_biases else 2) == 1
    if extra or per_direction not in (2, 3, 4, 5) or (projected and call.name != "lstm"):
        return
    if not all(isinstance(t, torch.Tensor) for t in (*states, *weights)):
        return
    hidden, width = weights[1].shape[0] // gates, weights[1].shape[1]  # width: what weight_hh reads
    unit = call.graph.new_space(hidden)
    state = call.graph.new_space(width) if projected else unit  # the hidden state: the output's channels
    for layer in range(layers):
        for direction in range(directions):
            first = (layer * directions + direction) * per_direction
            w_ih, w_hh = weights[first], weights[first + 1]
            for t in (w_ih, w_hh, *(weights[first + 2 : first + 4] if has_biases else ())):
                _gate_rows(call, t, unit, hidden, BIAS if t.dim() == 1 else PRODUCER)
            call.graph.unite(call.space(w_hh, 1), state)
            call.role(w_hh, 1, CONSUMER)
            if projected:
                w_hr = weights[first + per_direction - 1]
                call.graph.unite(call.space(w_hr, 0), state)
                call.graph.unite(call.space(w_hr, 1), unit)
                call.role(w_hr, 0, PRODUCER)
                call.role(w_hr, 1, CONSUMER)
            if layer == 0:
                call.unite(w_ih, 1, x, -1)
            else:  # the previous layer's output: its directions end to end
                _concatenated(call, call.space(w_ih, 1), state, width)
            call.role(w_ih, 1, CONSUMER)
    time_batch = [call.space(x, 0)] if packed else [call.space(x, 0), call.space(x, 1)]
    batch = None if packed else time_batch[0 if args[8] else 1]
    output = call.outputs[0]
    merged = state if directions == 1 else call.graph.new_space(output.shape[-1])
    if directions > 1:
        _concatenated(call, merged, state, width)
    call.set_out(output, [*time_batch, merged])
    if packed:
        call.claim_all(args[1])
    for initial, final, space in zip(states, call.outputs[1:], (state, unit), strict=False):
        call.graph.unite(call.space(initial, -1), space)
        if batch is not None:
            call.graph.unite(call.space(initial, 1), batch)
        call.set_out(final, [None, batch, space])
    _drop_own_sizes(call)


@rule("lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell")
def recurrent_cell(call: OpCall) -> None:
    """One step of a cell: ``(input, hx, weight_ih, weight_hh, bias_ih, bias_hh)``, ``hx`` is ``(h, c)`` for
    ``lstm_cell``; its hidden channel ``i`` is a unit as in :func:`recurrent`."""
    x, hx = call.args[0], call.arg(1, "hx")
    w_ih, w_hh = call.arg(2, "w_ih"), call.arg(3, "w_hh")
    biases = [b for b in (call.arg(4, "b_ih"), call.arg(5, "b_hh")) if isinstance(b, torch.Tensor)]
    states = list(hx) if call.name == "lstm_cell" else [hx]
    if x.dim() != 2 or not all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in (*states, w_ih, w_hh)):
        return
    hidden = w_hh.shape[1]
    unit = call.space(w_hh, 1)
    call.role(w_hh, 1, CONSUMER)
    for t in (w_ih, w_hh, *biases):
        _gate_rows(call, t, unit, hidden, BIAS if t.dim() == 1 else PRODUCER)
    call.unite(w_ih, 1, x, -1)
    call.role(w_ih, 1, CONSUMER)
    batch = call.space(x, 0)
    for initial, final in zip(states, call.outputs, strict=True):
        call.graph.unite(call.space(initial, 0), batch)
        call.graph.unite(call.space(initial, 1), unit)
        call.set_out(final, [batch, unit])
    _drop_own_sizes(call)


@rule("_pack_padded_sequence")
def pack_padded_sequence(call: OpCall) -> None:
    """``(input, lengths, batch_first)`` -> ``(data, batch_sizes)``: the time and batch dims become one, the
    feature dims pass through."""
    x, lengths = call.args[0], call.arg(1, "lengths")
    data, batch_sizes = call.outputs[:2]
    call.claim_all(lengths)
    call.set_out(data, [None] + [call.space(x, d) for d in range(2, x.dim())])
    call.set_out(batch_sizes, [None])


@rule("_pad_packed_sequence")
def pad_packed_sequence(call: OpCall) -> None:
    """``(data, batch_sizes, batch_first, padding_value, total_length)`` -> ``(padded, lengths)``: the
    feature dims pass through (the padding is the constant ``padding_value`` in every channel)."""
    data, batch_sizes = call.args[0], call.arg(1, "batch_sizes")
    padded, lengths = call.outputs[:2]
    call.claim_all(batch_sizes)
    call.set_out(padded, [None, None] + [call.space(data, d) for d in range(1, data.dim())])
    call.set_out(lengths, [None])


def _gate_rows(call: OpCall, t: torch.Tensor, unit: int, hidden: int, role: str) -> None:
    """Row ``g * hidden + i`` of a gate-stacked weight or bias is unit ``i``."""
    rows = np.arange(t.shape[0])
    call.link(call.space(t, 0), rows, unit, rows % hidden)
    call.role(t, 0, role)


def _concatenated(call: OpCall, merged: int, state: int, width: int) -> None:
    """Channel ``d * width + j`` of the directions laid end to end is channel ``j`` of ``state``."""
    idx = np.arange(call.graph.size(merged))
    call.link(merged, idx, state, idx % width)


def _drop_own_sizes(call: OpCall) -> None:
    """Forget the sizes a torch recurrent layer wrote for its zero initial states (``self.hidden_size``): its
    updater sets every count from the sliced weights, where matching old values could also hit ``input_size``."""
    path, module = call.tracer.running_module()
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        sites = call.tracer.size_sites
        sites[:] = [site for site in sites if site.path != path]


@updater(nn.RNNBase)
def _update_recurrent(m: nn.RNNBase) -> None:
    gates = GATES[m.mode.lower()]  # "LSTM", "GRU", "RNN_TANH", "RNN_RELU"
    m.input_size = m.weight_ih_l0.shape[1]
    m.hidden_size = m.weight_ih_l0.shape[0] // gates
    if m.proj_size:
        m.proj_size = m.weight_hr_l0.shape[0]
    m._init_flat_weights()
    m.flatten_parameters()


@updater(nn.RNNCellBase)
def _update_cell(m: nn.RNNCellBase) -> None:
    m.input_size, m.hidden_size = m.weight_ih.shape[1], m.weight_hh.shape[1]
