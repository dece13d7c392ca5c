"""SR-GNN (Wu et al., AAAI 2019) as RecBole 1.2.1 computes it, with the session graph built in jnp.

Each sequence becomes a graph over its unique items, with an edge between consecutive items and
in- and out-messages normalised by degree (RecBole's `_get_slice`), built inside the jitted step
with fixed shapes. Gated graph steps update the node states; an attention readout combines the
last item with the global preference. All parameters start U(-1/sqrt(H), 1/sqrt(H)).

RecBole multiplies dense [L, L] adjacencies and applies every dense map to every node of every
graph. Here messages are summed over the edge list and the first step's dense maps run once per
item: the same function (tests/test_recommenders.py compares it with RecBole's torch code), at
about twice the training speed (docs/benchmarks.md, 2026-11-30).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from slim_jax.models.backbone import Backbone, BackboneSpec, TableFn, item_table


def session_graph(inputs: jax.Array):
  """The session graphs of left-padded sequences int32[B, L], as RecBole's `_get_slice`, as edges.

  A node is an item; column c's node is the first column holding the same item. Edge t links
  column t's node to column t+1's. Returns (node int32[B, L]; in_weight, out_weight float[B, L-1]:
  edge t's weight in the in-messages of its target, 1 / the target's in-degree, and in the
  out-messages of its source, 1 / the source's out-degree). Edges touching padding, and repeats
  of an earlier edge, weigh 0: RecBole's adjacency counts a repeated transition once.
  """
  node = jnp.argmax(inputs[:, :, None] == inputs[:, None, :], axis=-1).astype(jnp.int32)
  source, target = node[:, :-1], node[:, 1:]
  pairwise = lambda x: x[:, :, None] == x[:, None, :]  # [B, L-1, L-1]: edge t, edge u
  same_source, same_target = pairwise(source), pairwise(target)
  earlier = jnp.tril(jnp.ones(same_source.shape[1:], bool), k=-1)  # u < t
  repeat = (same_source & same_target & earlier).any(-1)
  edge = ((inputs[:, :-1] > 0) & (inputs[:, 1:] > 0) & ~repeat).astype(jnp.float32)
  degree = lambda same: jnp.maximum(jnp.einsum("btu,bu->bt", same.astype(edge.dtype), edge), 1.0)
  return node, edge / degree(same_target), edge / degree(same_source)


def uniform_init(hidden: int):
  """RecBole's SRGNN initialiser: U(-1/sqrt(H), 1/sqrt(H)) for every parameter."""
  bound = 1 / math.sqrt(hidden)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def per_column(fn, states: jax.Array, items: jax.Array | None) -> jax.Array:
  """fn (row-wise) of every column's node state, [B, L, ...].

  `items` None: `states` are the column states [B, L, H]. Otherwise `states` is the item table
  [R, H] and `items` int32[B, L] the columns' items (the first graph step starts from the item
  embeddings). A row-wise fn commutes with that gather, so it runs on the smaller of the two:
  once per table row (ml-100k: 1,683 rows against 12,800 columns a batch) or once per column.
  """
  if items is None:
    return fn(states)
  if states.shape[0] <= items.size:
    return jnp.take(fn(states), items, axis=0)
  return fn(jnp.take(states, items, axis=0))


def aggregate(node, in_weight, out_weight, to_target, to_source):
  """Each column's in-message plus out-message [B, L, D], from per-column values [B, L, D].

  Edge t carries column t's `to_target` into its target's in-message and column t+1's
  `to_source` into its source's out-message: RecBole's a_in @ x + a_out @ y, summed over the
  edge list instead of a dense [L, L] adjacency, and read back per column.
  """
  rows = jnp.arange(node.shape[0])[:, None]
  per_node = (jnp.zeros(to_target.shape, to_target.dtype)
              .at[rows, node[:, 1:]].add(in_weight[..., None] * to_target[:, :-1])
              .at[rows, node[:, :-1]].add(out_weight[..., None] * to_source[:, 1:]))
  return jnp.take_along_axis(per_node, node[..., None], axis=1)


class GatedGraphStep(nn.Module):
  """One GRU-style update of the node states from their in- and out-neighbours (RecBole's GNNCell).

  RecBole computes gi = [a_in @ edge_in(h) + b_iah, a_out @ edge_out(h) + b_ioh] @ w_ih + b_ih.
  The aggregation is linear, so w_ih moves inside it: every dense map then acts on a node's own
  state (`per_column`), once per item on the first step.
  """
  hidden: int

  @nn.compact
  def __call__(self, states, items, graph):
    """New column states [B, L, H] from `states` and `items` as `per_column` takes them."""
    size = self.hidden
    init = uniform_init(size)
    param = lambda name, *shape: self.param(name, init, shape)
    w_ih, b_ih = param("w_ih", 2 * size, 3 * size), param("b_ih", 3 * size)
    w_hh, b_hh = param("w_hh", size, 3 * size), param("b_hh", 3 * size)
    b_iah, b_ioh = param("b_iah", size), param("b_ioh", size)
    edge_in = nn.Dense(size, kernel_init=init, bias_init=init, name="edge_in")
    edge_out = nn.Dense(size, kernel_init=init, bias_init=init, name="edge_out")
    w_in, w_out = w_ih[:size], w_ih[size:]
    to_target = per_column(lambda h: edge_in(h) @ w_in, states, items)
    to_source = per_column(lambda h: edge_out(h) @ w_out, states, items)
    gi = aggregate(*graph, to_target, to_source) + b_iah @ w_in + b_ioh @ w_out + b_ih
    gh = per_column(lambda h: h @ w_hh + b_hh, states, items)
    h = per_column(lambda h: h, states, items)
    i_r, i_z, i_n = jnp.split(gi, 3, -1)
    h_r, h_z, h_n = jnp.split(gh, 3, -1)
    reset = jax.nn.sigmoid(i_r + h_r)
    update = jax.nn.sigmoid(i_z + h_z)
    new = jnp.tanh(i_n + reset * h_n)
    return (1 - update) * h + update * new


class SRGNN(Backbone):
  steps: int = 1

  @nn.compact
  def __call__(self, inputs, train: bool = False, columns=None, table_fn: TableFn | None = None):
    """The session state [B, 1, H]: one state per sequence, from its whole graph (so `columns`,
    which can only ask for the last one, changes nothing); the graph's nodes start from the
    item table (item_emb's, or `table_fn` of it), which is also the table returned."""
    del train, columns  # SRGNN has no dropout
    init = uniform_init(self.hidden)
    dense = lambda n, name, bias=True: nn.Dense(n, use_bias=bias, kernel_init=init, bias_init=init,
                                                name=name)
    emb = nn.Embed(self.rows, self.hidden, embedding_init=init, name="item_emb")
    table = item_table(emb, table_fn)
    graph = session_graph(inputs)
    step = GatedGraphStep(self.hidden, name="gnn")
    seq = step(table, inputs, graph)  # [B, L, H], each column's node state
    for _ in range(self.steps - 1):
      seq = step(seq, None, graph)
    last = seq[:, -1]
    gate = dense(self.hidden, "attn_last")(last)[:, None] + dense(self.hidden, "attn_seq")(seq)
    alpha = dense(1, "attn_out", bias=False)(jax.nn.sigmoid(gate))
    preference = (alpha * seq * (inputs > 0)[..., None]).sum(1)
    state = dense(self.hidden, "combine")(jnp.concatenate([preference, last], -1))
    return state[:, None], table


SPEC = BackboneSpec(
    name="srgnn",
    defaults=dict(layers=1, dropout=0.0, attn_dropout=0.0, train_mode="last_position"),
    build=lambda cfg, **shared: SRGNN(**shared, steps=cfg.layers),
    per_position=False)  # one state per session graph
