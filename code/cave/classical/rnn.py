# Generated from docs/classical/rnn.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


# § Recurrent networks (docs/classical/rnn.md:28)
"""Recurrent networks from scratch: cells, layers, BPTT, seq2seq, char LSTM.

The chapter docs/classical/rnn.md builds, in order:

    rnn_step, lstm_step, gru_step   one time step of each recurrence
    RNNCell, LSTMCell, GRUCell      equal to nn.RNNCell, nn.LSTMCell, ...
    RNN, LSTM, GRU                  multi-layer, bidirectional, variable
                                    lengths; equal to nn.RNN, nn.LSTM,
                                    nn.GRU (state dicts load both ways)
    rnn_backward                    backpropagation through time by hand
    clip_grad_norm_                 equal to torch.nn.utils.clip_grad_norm_
    BahdanauAttention, Seq2Seq      encoder-decoder with additive attention,
                                    on the data chapter's DateTask
    CharLSTM                        character-level language model
    full_run                        both models trained for real

`cave run rnn --full` calls full_run and records its results in
cave/_results/rnn.json.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from cave.fundamentals.checkpoints import override_configs
from cave.fundamentals.data import (Batches, DateTask, Vocab,
                                    shakespeare_split)
from cave.fundamentals.deep_networks import Adam, one_cycle_lr
from cave.fundamentals.essentials import (eval_mode, pick_device,
                                          seed_everything)


# § One step of a recurrence (docs/classical/rnn.md:110)
def rnn_step(gi: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor | None,
             nonlinearity: str = "tanh") -> Tensor:
    """h' = act(gi + h W_hh^T + b_hh), gi = x W_ih^T + b_ih precomputed."""
    z = gi + h @ w_hh.T  # (B, H)
    if b_hh is not None:
        z = z + b_hh
    return torch.tanh(z) if nonlinearity == "tanh" else torch.relu(z)


# § The LSTM: a memory the gradient can travel along (docs/classical/rnn.md:159)
def lstm_step(gi: Tensor, h: Tensor, c: Tensor, w_hh: Tensor,
              b_hh: Tensor | None) -> tuple[Tensor, Tensor]:
    """One LSTM step; gi = x W_ih^T + b_ih (B, 4H), gates i, f, g, o."""
    gates = gi + h @ w_hh.T  # (B, 4H)
    if b_hh is not None:
        gates = gates + b_hh
    i, f, g, o = gates.chunk(4, dim=-1)  # each (B, H)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # (B, H)
    h = torch.sigmoid(o) * torch.tanh(c)  # (B, H)
    return h, c


# § The GRU: two gates instead of three (docs/classical/rnn.md:201)
def gru_step(gi: Tensor, h: Tensor, w_hh: Tensor,
             b_hh: Tensor | None) -> Tensor:
    """One GRU step; gi = x W_ih^T + b_ih (B, 3H), gates r, z, n."""
    gh = h @ w_hh.T  # (B, 3H)
    if b_hh is not None:
        gh = gh + b_hh
    i_r, i_z, i_n = gi.chunk(3, dim=-1)  # each (B, H)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)  # each (B, H)
    r = torch.sigmoid(i_r + h_r)  # reset gate
    z = torch.sigmoid(i_z + h_z)  # update gate
    n = torch.tanh(i_n + r * h_n)  # candidate; r scales W_hn h + b_hn
    return (1 - z) * n + z * h  # (B, H)


# § Cells (docs/classical/rnn.md:231)
class _Cell(nn.Module):
    gates = 1  # rows of weight_ih per hidden unit: 1, 4 (LSTM), 3 (GRU)

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if input_size < 1 or hidden_size < 1:
            raise ValueError(f"input_size and hidden_size must be >= 1, got "
                             f"{input_size} and {hidden_size}")
        self.input_size, self.hidden_size, self.bias = (input_size,
                                                        hidden_size, bias)
        kw = {"device": device, "dtype": dtype}
        G, H = self.gates, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(G * H, input_size, **kw))
        self.weight_hh = nn.Parameter(torch.empty(G * H, H, **kw))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(G * H, **kw))
            self.bias_hh = nn.Parameter(torch.empty(G * H, **kw))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every parameter from U(-1/sqrt(H), 1/sqrt(H)), in order."""
        bound = 1 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            p.uniform_(-bound, bound)

    def _check(self, x: Tensor, states: Sequence[Tensor]) -> None:
        if x.ndim != 2 or x.shape[1] != self.input_size:
            raise ValueError(f"{type(self).__name__} expected input of "
                             f"shape (B, {self.input_size}), got "
                             f"{tuple(x.shape)}")
        want = (x.shape[0], self.hidden_size)
        for s in states:
            if tuple(s.shape) != want:
                raise ValueError(f"{type(self).__name__} expected a state "
                                 f"of shape {want}, got {tuple(s.shape)}")

    def _zeros(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], self.hidden_size)  # (B, H)

    def _gi(self, x: Tensor) -> Tensor:
        gi = x @ self.weight_ih.T  # (B, G*H)
        return gi if self.bias_ih is None else gi + self.bias_ih

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}"
                + ("" if self.bias else ", bias=False"))


class RNNCell(_Cell):
    """h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh), like nn.RNNCell."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got "
                             f"{nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, bias, device, dtype)

    def forward(self, x: Tensor, h: Tensor | None = None) -> Tensor:
        h = self._zeros(x) if h is None else h
        self._check(x, [h])
        return rnn_step(self._gi(x), h, self.weight_hh, self.bias_hh,
                        self.nonlinearity)  # (B, H)


class LSTMCell(_Cell):
    """One LSTM step on (h, c), like nn.LSTMCell; gates i, f, g, o."""

    gates = 4

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, Tensor]:
        h, c = (self._zeros(x), self._zeros(x)) if state is None else state
        self._check(x, [h, c])
        return lstm_step(self._gi(x), h, c, self.weight_hh, self.bias_hh)


class GRUCell(_Cell):
    """One GRU step, like nn.GRUCell; gates r, z, n."""

    gates = 3

    def forward(self, x: Tensor, h: Tensor | None = None) -> Tensor:
        h = self._zeros(x) if h is None else h
        self._check(x, [h])
        return gru_step(self._gi(x), h, self.weight_hh, self.bias_hh)


# § Layers: sequences, stacks, both directions, ragged batches (docs/classical/rnn.md:387)
class _Recurrent(nn.Module):
    gates = 1
    n_states = 1  # tensors in the state: 1, or 2 for the LSTM's (h, c)

    def __init__(self, input_size: int, hidden_size: int,
                 num_layers: int = 1, bias: bool = True,
                 batch_first: bool = True, dropout: float = 0.0,
                 bidirectional: bool = False, device=None, dtype=None):
        super().__init__()
        if input_size < 1 or hidden_size < 1 or num_layers < 1:
            raise ValueError(f"input_size, hidden_size and num_layers must "
                             f"be >= 1, got {input_size}, {hidden_size}, "
                             f"{num_layers}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.num_layers, self.bias = num_layers, bias
        self.batch_first, self.dropout = batch_first, dropout
        self.bidirectional = bidirectional
        D, G, H = 1 + bidirectional, self.gates, hidden_size
        kw = {"device": device, "dtype": dtype}
        for layer in range(num_layers):
            size = input_size if layer == 0 else D * H  # what it reads
            for suffix in self._suffixes()[:D]:
                name = f"l{layer}{suffix}"
                self.register_parameter(f"weight_ih_{name}", nn.Parameter(
                    torch.empty(G * H, size, **kw)))  # (G*H, I)
                self.register_parameter(f"weight_hh_{name}", nn.Parameter(
                    torch.empty(G * H, H, **kw)))  # (G*H, H)
                if bias:
                    self.register_parameter(f"bias_ih_{name}", nn.Parameter(
                        torch.empty(G * H, **kw)))  # (G*H,)
                    self.register_parameter(f"bias_hh_{name}", nn.Parameter(
                        torch.empty(G * H, **kw)))  # (G*H,)
        self.reset_parameters()

    @staticmethod
    def _suffixes() -> tuple[str, str]:
        return ("", "_reverse")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every parameter from U(-1/sqrt(H), 1/sqrt(H)), as PyTorch does."""
        bound = 1 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            p.uniform_(-bound, bound)

    def _weights(self, layer: int, reverse: bool):
        name = f"l{layer}{'_reverse' if reverse else ''}"
        return (getattr(self, f"weight_ih_{name}"),
                getattr(self, f"weight_hh_{name}"),
                getattr(self, f"bias_ih_{name}", None),
                getattr(self, f"bias_hh_{name}", None))

    def _step(self, gi, state, w_hh, b_hh):
        raise NotImplementedError

    def _check_lengths(self, lengths, B: int, T: int) -> Tensor:
        lengths = torch.as_tensor(lengths).reshape(-1)
        if lengths.is_floating_point() or lengths.shape[0] != B:
            raise ValueError(f"{type(self).__name__} expected lengths: B={B}"
                             f" integers, got {lengths.dtype} of shape "
                             f"{tuple(lengths.shape)}")
        if len(lengths) and (lengths.min() < 1 or lengths.max() > T):
            raise ValueError(f"{type(self).__name__} expected lengths in "
                             f"[1, T={T}], got min {int(lengths.min())}, "
                             f"max {int(lengths.max())}")
        return lengths

    def _check_state(self, hx, B: int, like: Tensor) -> tuple[Tensor, ...]:
        LD = self.num_layers * (1 + self.bidirectional)
        want = (LD, B, self.hidden_size)
        if hx is None:
            return tuple(like.new_zeros(want) for _ in range(self.n_states))
        states = (hx,) if isinstance(hx, Tensor) else tuple(hx)
        if len(states) != self.n_states:
            raise ValueError(f"{type(self).__name__} expected a state of "
                             f"{self.n_states} tensor(s), got {len(states)}")
        for s in states:
            if tuple(s.shape) != want:
                raise ValueError(f"{type(self).__name__} expected a state "
                                 f"of shape (num_layers * directions, B, "
                                 f"hidden_size) = {want}, got "
                                 f"{tuple(s.shape)}")
        return states

    def forward(self, x: Tensor, hx=None, lengths=None):
        """x (B, T, I) -> output (B, T, D*H) and the final state.

        hx: (L*D, B, H), or (h, c) for the LSTM; zeros if None.
        lengths: (B,) real lengths; outputs past them are zero and the
        final state is each sequence's state at its last real step, as
        with a PackedSequence. The state is (L*D, B, H), like PyTorch's,
        whatever batch_first says.
        """
        name = type(self).__name__
        if x.ndim != 3:
            layout = "(B, T, I)" if self.batch_first else "(T, B, I)"
            raise ValueError(f"{name} expected a 3-D input {layout}, got "
                             f"shape {tuple(x.shape)}")
        if not self.batch_first:
            x = x.transpose(0, 1)  # (T, B, I) -> (B, T, I)
        B, T, I = x.shape
        if I != self.input_size:
            raise ValueError(f"{name} expected input size {self.input_size},"
                             f" got input of shape {tuple(x.shape)}")
        mask = None
        if lengths is not None:
            lengths = self._check_lengths(lengths, B, T).to(x.device)
            steps = torch.arange(T, device=x.device)  # (T,)
            mask = (steps < lengths[:, None])[..., None]  # (B, T, 1)
        states = self._check_state(hx, B, x)  # each (L*D, B, H)
        D = 1 + self.bidirectional
        finals = []  # one state tuple per layer and direction
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(D):
                k = layer * D + direction
                state = tuple(s[k] for s in states)  # each (B, H)
                out, state = self._run(x, state, mask, layer,
                                       reverse=direction == 1)
                outputs.append(out)  # (B, T, H)
                finals.append(state)
            x = torch.cat(outputs, dim=-1) if D == 2 else outputs[0]
            if self.dropout > 0 and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, self.training)  # (B, T, D*H)
        if not self.batch_first:
            x = x.transpose(0, 1)  # (T, B, D*H)
        h_n = tuple(torch.stack(s, 0) for s in zip(*finals))  # (L*D, B, H)
        return x, (h_n if self.n_states > 1 else h_n[0])

    def _run(self, x: Tensor, state, mask, layer: int, reverse: bool):
        """One direction of one layer over all T steps."""
        w_ih, w_hh, b_ih, b_hh = self._weights(layer, reverse)
        gi = x @ w_ih.T  # (B, T, G*H): every step's input at once
        if b_ih is not None:
            gi = gi + b_ih
        gis = gi.unbind(1)  # T tensors (B, G*H); one backward for all
        T = len(gis)
        outputs = [None] * T
        for t in (reversed(range(T)) if reverse else range(T)):
            new = self._step(gis[t], state, w_hh, b_hh)  # each (B, H)
            if mask is None:
                state = new
                outputs[t] = new[0]
            else:  # past its length a sequence keeps its state, emits 0
                m = mask[:, t]  # (B, 1), no gradient flows through it
                state = tuple(torch.where(m, n, s)
                              for n, s in zip(new, state))
                outputs[t] = new[0] * m
        return torch.stack(outputs, dim=1), state  # (B, T, H)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if not self.batch_first:
            s += ", batch_first=False"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s


class RNN(_Recurrent):
    """Elman RNN layers, like nn.RNN(..., batch_first=True)."""

    def __init__(self, input_size: int, hidden_size: int,
                 num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = True,
                 dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got "
                             f"{nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, device, dtype)

    def _step(self, gi, state, w_hh, b_hh):
        return (rnn_step(gi, state[0], w_hh, b_hh, self.nonlinearity),)


class LSTM(_Recurrent):
    """LSTM layers, like nn.LSTM(..., batch_first=True); state (h, c)."""

    gates, n_states = 4, 2

    def _step(self, gi, state, w_hh, b_hh):
        return lstm_step(gi, state[0], state[1], w_hh, b_hh)


class GRU(_Recurrent):
    """GRU layers, like nn.GRU(..., batch_first=True)."""

    gates = 3

    def _step(self, gi, state, w_hh, b_hh):
        return (gru_step(gi, state[0], w_hh, b_hh),)


# § Backpropagation through time (docs/classical/rnn.md:738)
def rnn_forward(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor,
                b: Tensor) -> Tensor:
    """Every state h_1..h_T (B, T, H) of h_t = tanh(x_t W_ih^T + h W_hh^T + b).

    b is b_ih + b_hh: the two biases always appear as a sum.
    """
    hs, h = [], h0  # h0 (B, H)
    for x_t in x.unbind(1):  # T tensors (B, I)
        h = torch.tanh(x_t @ w_ih.T + h @ w_hh.T + b)  # (B, H)
        hs.append(h)
    return torch.stack(hs, dim=1)  # (B, T, H)


def rnn_backward(x: Tensor, h0: Tensor, hs: Tensor, w_ih: Tensor,
                 w_hh: Tensor, grad_hs: Tensor) -> dict[str, Tensor]:
    """Backpropagation through time for rnn_forward, by hand.

    grad_hs (B, T, H) is dL/dh_t from the loss directly (the outputs'
    gradient). Walking back from t = T, the gradient reaching h_t is that
    plus what flows back from h_{t+1}: dh_t = grad_hs_t + da_{t+1} W_hh.
    Returns the gradients of x, h0, w_ih, w_hh and b, and dh_norms (T,):
    the norm of the total dL/dh_t, the signal that vanishes or explodes.
    """
    B, T, H = hs.shape
    dw_ih, dw_hh = torch.zeros_like(w_ih), torch.zeros_like(w_hh)
    db = hs.new_zeros(H)
    dx = torch.zeros_like(x)  # (B, T, I)
    dh = hs.new_zeros(B, H)  # gradient arriving from the future
    dh_norms = hs.new_zeros(T)
    for t in reversed(range(T)):
        dh = dh + grad_hs[:, t]  # (B, H) total dL/dh_t
        dh_norms[t] = dh.norm()
        da = dh * (1 - hs[:, t] ** 2)  # (B, H) through tanh' = 1 - tanh^2
        h_prev = hs[:, t - 1] if t > 0 else h0  # (B, H)
        dw_ih += da.T @ x[:, t]  # (H, I)
        dw_hh += da.T @ h_prev  # (H, H)
        db += da.sum(0)  # (H,)
        dx[:, t] = da @ w_ih  # (B, I)
        dh = da @ w_hh  # (B, H) one step further back
    return {"x": dx, "h0": dh, "w_ih": dw_ih, "w_hh": dw_hh, "b": db,
            "dh_norms": dh_norms}


# § Gradient clipping (docs/classical/rnn.md:936)
def clip_grad_norm_(parameters: Tensor | Iterable[Tensor], max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: bool | None = None) -> Tensor:
    """Scale all gradients by min(1, max_norm / ||g||); return ||g||.

    ||g|| is the norm_type-norm of all gradients together, as if
    concatenated into one vector; equal to torch.nn.utils.clip_grad_norm_.
    parameters: one tensor or an iterable (a generator is read once);
    those without a gradient are skipped. foreach is PyTorch's choice of
    kernel, a matter of speed: the numbers are the same either way.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    if isinstance(parameters, Tensor):  # one tensor, not its rows
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    device = grads[0].device
    norms = [torch.linalg.vector_norm(g.detach(), norm_type).to(device)
             for g in grads]  # one per tensor: ||g_k||_p
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)  # ()
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} of the "
                           f"gradients is {total.item()}: expected a "
                           f"finite number (error_if_nonfinite=True)")
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)  # () never > 1
    for g in grads:
        g.detach().mul_(scale.to(g.device))
    return total


# § Sequence to sequence with additive attention (docs/classical/rnn.md:1080)
class BahdanauAttention(nn.Module):
    """score_j = v^T tanh(W_q s + W_k h_j); weights = softmax over j.

    The keys W_k h_j are computed once per source (`keys`); each decoder
    step then costs one small matrix product for W_q s.
    """

    def __init__(self, query_size: int, key_size: int, attn_size: int):
        super().__init__()
        self.w_q = nn.Linear(query_size, attn_size, bias=False)
        self.w_k = nn.Linear(key_size, attn_size)
        self.v = nn.Linear(attn_size, 1, bias=False)

    def keys(self, values: Tensor) -> Tensor:
        return self.w_k(values)  # (B, S, K) -> (B, S, A)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor,
                mask: Tensor) -> tuple[Tensor, Tensor]:
        """query (B, Hq), keys (B, S, A), values (B, S, K), mask (B, S)
        True at real positions -> context (B, K), weights (B, S)."""
        q = self.w_q(query)[:, None, :]  # (B, 1, A)
        scores = self.v(torch.tanh(q + keys)).squeeze(-1)  # (B, S)
        scores = scores.masked_fill(~mask, float("-inf"))  # no padding
        weights = torch.softmax(scores, dim=-1)  # (B, S)
        context = (weights[:, None, :] @ values).squeeze(1)  # (B, K)
        return context, weights


@dataclasses.dataclass
class Seq2SeqConfig:
    src_vocab: int = len(DateTask.SRC_CHARS) + 3  # characters + specials
    tgt_vocab: int = len(DateTask.TGT_CHARS) + 3
    embed: int = 32  # ~70 source characters need few dimensions
    hidden: int = 128  # per encoder direction, and the decoder's state
    attention: int = 64  # size of the space where queries meet keys


class Seq2Seq(nn.Module):
    """Bidirectional GRU encoder, GRU decoder with Bahdanau attention.

    forward(src, src_lengths, tgt_in) -> logits (B, T, tgt_vocab), teacher
    forced; greedy(src, src_lengths, max_len) -> (ids, attention weights).
    """

    def __init__(self, config: Seq2SeqConfig = Seq2SeqConfig()):
        super().__init__()
        self.config = c = config
        self.src_embed = nn.Embedding(c.src_vocab, c.embed)
        self.encoder = GRU(c.embed, c.hidden, bidirectional=True)
        self.init_state = nn.Linear(c.hidden, c.hidden)
        self.attention = BahdanauAttention(c.hidden, 2 * c.hidden,
                                           c.attention)
        self.tgt_embed = nn.Embedding(c.tgt_vocab, c.embed)
        self.decoder = GRUCell(c.embed + 2 * c.hidden, c.hidden)
        self.out = nn.Linear(c.hidden + 2 * c.hidden + c.embed, c.tgt_vocab)

    def encode(self, src: Tensor, src_lengths: Tensor):
        """src (B, S) -> (values (B, S, 2H), keys (B, S, A), mask (B, S),
        first decoder state (B, H))."""
        if src.ndim != 2 or src_lengths.shape != src.shape[:1]:
            raise ValueError(f"expected src (B, S) and src_lengths (B,), "
                             f"got {tuple(src.shape)} and "
                             f"{tuple(src_lengths.shape)}")
        x = self.src_embed(src)  # (B, S, E)
        values, h_n = self.encoder(x, lengths=src_lengths)  # (B, S, 2H)
        # the backward direction ends on the first character, having read
        # the whole source: Bahdanau's summary for the decoder's start
        s = torch.tanh(self.init_state(h_n[1]))  # (B, H)
        steps = torch.arange(src.shape[1], device=src.device)  # (S,)
        mask = steps < src_lengths.to(src.device)[:, None]  # (B, S)
        return values, self.attention.keys(values), mask, s

    def step(self, y_prev: Tensor, s: Tensor, values: Tensor, keys: Tensor,
             mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One decoder step: previous token (B,), state (B, H) ->
        (logits (B, V), new state (B, H), attention weights (B, S))."""
        e = self.tgt_embed(y_prev)  # (B, E)
        context, weights = self.attention(s, keys, values, mask)  # (B, 2H)
        s = self.decoder(torch.cat([e, context], dim=-1), s)  # (B, H)
        logits = self.out(torch.cat([s, context, e], dim=-1))  # (B, V)
        return logits, s, weights

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor
                ) -> Tensor:
        values, keys, mask, s = self.encode(src, src_lengths)
        logits = []
        for y_prev in tgt_in.unbind(1):  # teacher forcing: the true token
            step_logits, s, _ = self.step(y_prev, s, values, keys, mask)
            logits.append(step_logits)
        return torch.stack(logits, dim=1)  # (B, T, V)

    @torch.no_grad()
    def greedy(self, src: Tensor, src_lengths: Tensor, max_len: int = 11
               ) -> tuple[Tensor, Tensor]:
        """Feed back the most likely token -> ids (B, max_len) and the
        attention weights (B, max_len, S), in evaluation mode."""
        with eval_mode(self):
            values, keys, mask, s = self.encode(src, src_lengths)
            y = torch.full((src.shape[0],), Vocab.BOS, device=src.device)
            ids, weights = [], []
            for _ in range(max_len):
                logits, s, w = self.step(y, s, values, keys, mask)
                y = logits.argmax(dim=-1)  # (B,)
                ids.append(y)
                weights.append(w)
        return torch.stack(ids, 1), torch.stack(weights, 1)


# § Training, and exact match (docs/classical/rnn.md:1232)
@dataclasses.dataclass
class Seq2SeqTrainConfig:
    epochs: int = 2  # one pass nearly solves it in our runs; two for sure
    batch_size: int = 128  # 235 steps an epoch on 30,000 pairs
    lr: float = 3e-3  # Adam's peak; the one-cycle schedule warms up to it
    clip: float = 1.0  # gradient-norm clipping: the recurrence can spike
    seed: int = 0  # initial weights and batch order


def seq2seq_loss(model: Seq2Seq, src: Tensor, src_lengths: Tensor,
                 tgt: Tensor) -> Tensor:
    """Teacher-forced cross-entropy: read tgt[:, :-1], predict tgt[:, 1:]."""
    logits = model(src, src_lengths, tgt[:, :-1])  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                           tgt[:, 1:].reshape(-1),
                           ignore_index=Vocab.PAD)  # (B*T, V) vs (B*T,)


def train_seq2seq(model: Seq2Seq, task: DateTask,
                  config: Seq2SeqTrainConfig = Seq2SeqTrainConfig(),
                  max_steps: int | None = None) -> list[float]:
    """Adam, one-cycle schedule, clipping; returns every step's loss."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    steps = config.epochs * math.ceil(len(task.train) / config.batch_size)
    steps = steps if max_steps is None else min(steps, max_steps)
    optimiser = Adam(model.parameters(), lr=config.lr)
    losses = []
    model.train()
    while len(losses) < steps:
        for src, lengths, tgt in task.batches("train", config.batch_size,
                                              generator):
            for group in optimiser.param_groups:
                group["lr"] = one_cycle_lr(len(losses), steps, config.lr)
            loss = seq2seq_loss(model, src.to(device), lengths.to(device),
                                tgt.to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            clip_grad_norm_(model.parameters(), config.clip)
            optimiser.step()
            losses.append(loss.item())
            if len(losses) == steps:
                break
    return losses


# § Character-level Shakespeare (docs/classical/rnn.md:1393)
@dataclasses.dataclass
class CharLSTMConfig:
    vocab_size: int = 65  # Tiny Shakespeare's distinct characters
    embed: int = 64  # 65 characters need few dimensions
    hidden: int = 256  # enough to spell; small enough for a CPU's minutes
    layers: int = 2  # the classic char-rnn depth: a second layer of state
    dropout: float = 0.1  # between the two layers only: a light regulariser
    cell: str = "lstm"  # "rnn" (Elman) and "gru" for the comparison below


CELLS = {"rnn": RNN, "lstm": LSTM, "gru": GRU}


class CharLSTM(nn.Module):
    """Embedding -> recurrent layers (LSTM unless the config says "rnn" or
    "gru") -> Linear: the next character's logits."""

    def __init__(self, config: CharLSTMConfig = CharLSTMConfig()):
        super().__init__()
        if config.cell not in CELLS:
            raise ValueError(f"cell must be one of {tuple(CELLS)}, got "
                             f"{config.cell!r}")
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.embed)
        self.lstm = CELLS[c.cell](c.embed, c.hidden, c.layers,
                                  dropout=c.dropout)
        self.head = nn.Linear(c.hidden, c.vocab_size)

    def forward(self, ids: Tensor, state=None):
        """ids (B, T) -> logits (B, T, V) and the final state ((h, c) for
        an LSTM, h otherwise)."""
        out, state = self.lstm(self.embed(ids), state)  # (B, T, H)
        return self.head(out), state  # (B, T, V)

    @torch.no_grad()
    def generate(self, prompt: Tensor, n: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
        """Continue prompt (T0,) by n ids, sampling softmax(logits / t)."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        out = []
        with eval_mode(self):
            logits, state = self(prompt[None])  # the prompt, all at once
            for _ in range(n):  # then one character at a time, state kept
                probs = torch.softmax(logits[0, -1] / temperature, dim=-1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator)
                out.append(nxt.item())
                logits, state = self(nxt.to(prompt.device)[None], state)
        return torch.tensor(out)  # (n,)


@dataclasses.dataclass
class CharTrainConfig:
    steps: int = 1500  # minutes on a CPU: the record says how many
    batch_size: int = 64  # windows per step
    block_size: int = 64  # characters per window: BPTT truncated there
    lr: float = 3e-3  # Adam's peak, one-cycle schedule
    clip: float = 1.0  # gradient-norm clipping
    eval_windows: int = 256  # validation windows, fixed by the seed
    seed: int = 0


@torch.no_grad()
def char_loss(model: CharLSTM, ids: Tensor, windows: int, block_size: int,
              seed: int = 0) -> float:
    """Mean cross-entropy (nats per character) on fixed random windows."""
    device = next(model.parameters()).device
    x, y = Batches(ids, windows, block_size, seed).next()  # (N, T) each
    with eval_mode(model):
        logits, _ = model(x.to(device))  # (N, T, V)
    return F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten()
                           ).item()


def train_char_lstm(model: CharLSTM, train_ids: Tensor,
                    config: CharTrainConfig = CharTrainConfig()
                    ) -> list[float]:
    """Adam, one-cycle schedule, clipping; returns every step's loss."""
    device = next(model.parameters()).device
    batches = Batches(train_ids, config.batch_size, config.block_size,
                      config.seed)
    optimiser = Adam(model.parameters(), lr=config.lr)
    losses = []
    model.train()
    for step in range(config.steps):
        for group in optimiser.param_groups:
            group["lr"] = one_cycle_lr(step, config.steps, config.lr)
        x, y = batches.next()  # (B, T) each
        logits, _ = model(x.to(device))  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten())
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm_(model.parameters(), config.clip)
        optimiser.step()
        losses.append(loss.item())
    return losses


# § Then and now: Elman, LSTM and GRU on one task (docs/classical/rnn.md:1582)
CELL_MODEL = CharLSTMConfig(hidden=128, layers=1, dropout=0.0)
CELL_TRAIN = CharTrainConfig(steps=600, batch_size=32)  # about a minute
# per cell on a 2-core CPU: the comparison, not the best model


# § From the command line (docs/classical/rnn.md:1659)
TEMPERATURES = (0.5, 0.8, 1.2)  # samples recorded at each


FULL_RUN_PARTS = ("seq2seq", "char_lstm", "cells")


def full_run(device: str | None = None, part: str = "seq2seq",
             **overrides) -> dict:
    """Train one part for real; return its record (an entry of rnn.json).

    overrides: fields of Seq2SeqTrainConfig prefixed seq2seq_ and of
    CharTrainConfig prefixed char_ (seq2seq_epochs=1, char_steps=300);
    the part "cells" starts from CELL_TRAIN instead of CharTrainConfig().
    """
    if part not in FULL_RUN_PARTS:
        raise ValueError(f"part must be one of {FULL_RUN_PARTS}, "
                         f"got {part!r}")
    char_base = CELL_TRAIN if part == "cells" else CharTrainConfig()
    config, cconfig = override_configs(
        {"seq2seq": Seq2SeqTrainConfig(), "char": char_base}, overrides)
    device = pick_device(device)
    if part == "seq2seq":
        return _seq2seq_record(config, device)
    tokenizer, train_ids, val_ids = shakespeare_split()
    if part == "cells":
        runs = {}
        for cell in CELLS:
            model_config = dataclasses.replace(
                CELL_MODEL, vocab_size=tokenizer.vocab_size, cell=cell)
            seed_everything(cconfig.seed)
            lm = CharLSTM(model_config).to(device)
            start = time.perf_counter()
            closses = train_char_lstm(lm, train_ids, cconfig)
            runs[cell] = {
                "parameters": sum(p.numel() for p in lm.parameters()),
                "final_train_loss": sum(closses[-50:]) / 50,
                "val_loss": char_loss(lm, val_ids, cconfig.eval_windows,
                                      cconfig.block_size, cconfig.seed),
                "seconds": time.perf_counter() - start,
                "loss_every_10_steps": closses[::10]}
        return {"device": str(device), "model": dataclasses.asdict(
            CELL_MODEL), "train": dataclasses.asdict(cconfig), "runs": runs}
    seed_everything(cconfig.seed)
    lm = CharLSTM(CharLSTMConfig(vocab_size=tokenizer.vocab_size)).to(device)
    start = time.perf_counter()
    closses = train_char_lstm(lm, train_ids, cconfig)
    seconds = time.perf_counter() - start
    generator = torch.Generator().manual_seed(0)
    prompt = tokenizer.encode("ROMEO:\n").to(device)
    samples = {str(t): tokenizer.decode(lm.generate(prompt, 300, t,
                                                    generator))
               for t in TEMPERATURES}
    return {
        "device": str(device),
        "model": dataclasses.asdict(lm.config),
        "train": dataclasses.asdict(cconfig),
        "final_train_loss": sum(closses[-50:]) / len(closses[-50:]),
        "val_loss": char_loss(lm, val_ids, cconfig.eval_windows,
                              cconfig.block_size, cconfig.seed),
        "seconds": seconds, "prompt": "ROMEO:\n", "samples": samples,
        "loss_every_10_steps": closses[::10]}


def _seq2seq_record(config: Seq2SeqTrainConfig, device: torch.device
                    ) -> dict:
    """Train the date translator; its record, with the test errors and
    the attention of the first test date."""
    task = DateTask(seed=0)
    seed_everything(config.seed)
    model = Seq2Seq().to(device)
    start = time.perf_counter()
    losses = train_seq2seq(model, task, config)
    seconds = time.perf_counter() - start

    def decode(src: Tensor, lengths: Tensor) -> Tensor:
        return model.greedy(src, lengths)[0]  # ids (B, 11)

    val, _ = task.exact_match(decode, "val", device=device)
    test, outputs = task.exact_match(decode, "test", device=device)
    src, lengths, _ = task.tensors("test")
    k = 0  # the first test example: its attention map
    ids, weights = model.greedy(src[k:k + 1].to(device),
                                lengths[k:k + 1].to(device))
    n_src, n_out = int(lengths[k]), len(task.test[k][1]) + 1
    return {
        "device": str(device), "task": repr(task),
        "model": dataclasses.asdict(model.config),
        "train": dataclasses.asdict(config), "steps": len(losses),
        "final_train_loss": losses[-1], "val_exact_match": val,
        "test_exact_match": test, "seconds": seconds,
        "test_errors": [(s, t, o) for (s, t), o in zip(task.test, outputs)
                        if o != t][:20],
        "attention_example": {
            "source": task.test[k][0], "output": outputs[k],
            "weights": weights[0, :n_out, :n_src].cpu().tolist()}}
