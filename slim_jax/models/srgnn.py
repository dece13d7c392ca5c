"""SR-GNN (Wu et al., AAAI 2019) as in RecBole, with the session graph built in jnp.

Each sequence becomes a graph over its unique items (edges between consecutive items, in- and
out-adjacency normalised by degree, as RecBole's `_get_slice`), built inside the jitted step with
fixed shapes (at most L nodes). Gated graph steps update the node states; an attention readout
combines the last item with the global preference. All parameters start U(-1/sqrt(H), 1/sqrt(H)).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from slim_jax.models.recommender import Backbone


def session_graph(inputs: jax.Array):
  """Session graphs of left-padded sequences int32[B, L].

  Returns (nodes int32[B, L]: sorted unique items, padded with 0; alias int32[B, L]: node index of
  each column; a_in, a_out float[B, L, L]: a_in[i, j] = edge j->i / in-degree(i),
  a_out[i, j] = edge i->j / out-degree(i)). Repeated transitions count once, as in RecBole.
  """
  length = inputs.shape[1]
  nodes = jax.vmap(lambda s: jnp.unique(s, size=length, fill_value=0))(inputs)
  alias = jnp.argmax(inputs[:, :, None] == nodes[:, None, :], axis=-1).astype(jnp.int32)
  onehot = jax.nn.one_hot(alias, length)
  real_pair = ((inputs[:, :-1] > 0) & (inputs[:, 1:] > 0)).astype(onehot.dtype)
  edges = jnp.einsum("bti,btj->bij", onehot[:, :-1] * real_pair[..., None], onehot[:, 1:])
  edges = jnp.minimum(edges, 1.0)
  in_degree = jnp.maximum(edges.sum(1), 1.0)
  out_degree = jnp.maximum(edges.sum(2), 1.0)
  a_in = jnp.swapaxes(edges, 1, 2) / in_degree[:, :, None]
  a_out = edges / out_degree[:, :, None]
  return nodes, alias, a_in, a_out


def uniform_init(hidden: int):
  """RecBole's SRGNN initialiser: U(-1/sqrt(H), 1/sqrt(H)) for every parameter."""
  bound = 1 / math.sqrt(hidden)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class GatedGraphStep(nn.Module):
  """One GRU-style update of the node states from their in- and out-neighbours."""
  hidden: int

  @nn.compact
  def __call__(self, h, a_in, a_out):
    init = uniform_init(self.hidden)
    dense = lambda n, name: nn.Dense(n, kernel_init=init, bias_init=init, name=name)
    msg_in = a_in @ dense(self.hidden, "edge_in")(h)
    msg_out = a_out @ dense(self.hidden, "edge_out")(h)
    gi = dense(3 * self.hidden, "w_ih")(jnp.concatenate([msg_in, msg_out], -1))
    gh = dense(3 * self.hidden, "w_hh")(h)
    i_r, i_z, i_n = jnp.split(gi, 3, -1)
    h_r, h_z, h_n = jnp.split(gh, 3, -1)
    reset = jax.nn.sigmoid(i_r + h_r)
    update = jax.nn.sigmoid(i_z + h_z)
    new = jnp.tanh(i_n + reset * h_n)
    return (1 - update) * h + update * new


class SRGNN(Backbone):
  steps: int = 1

  @nn.compact
  def __call__(self, inputs, train: bool = False):
    """The session state [B, 1, H]: one state per sequence, from its whole graph."""
    del train  # SRGNN has no dropout
    init = uniform_init(self.hidden)
    dense = lambda n, name, bias=True: nn.Dense(n, use_bias=bias, kernel_init=init, bias_init=init,
                                                name=name)
    emb = nn.Embed(self.rows, self.hidden, embedding_init=init, name="item_emb")
    nodes, alias, a_in, a_out = session_graph(inputs)
    h = emb(nodes)
    step = GatedGraphStep(self.hidden, name="gnn")
    for _ in range(self.steps):
      h = step(h, a_in, a_out)
    seq = jnp.take_along_axis(h, alias[..., None], axis=1)  # [B, L, H], node state per column
    last = seq[:, -1]
    gate = dense(self.hidden, "attn_last")(last)[:, None] + dense(self.hidden, "attn_seq")(seq)
    alpha = dense(1, "attn_out", bias=False)(jax.nn.sigmoid(gate))
    preference = (alpha * seq * (inputs > 0)[..., None]).sum(1)
    state = dense(self.hidden, "combine")(jnp.concatenate([preference, last], -1))
    return state[:, None], emb.embedding
