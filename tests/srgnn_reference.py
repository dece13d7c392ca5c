"""RecBole 1.2.1's SRGNN forward pass in torch (test-only reference; RecBole itself is not installed).

Copied from recbole/model/sequential_recommender/srgnn.py (`GNN.GNNCell`, `SRGNN._get_slice`,
`SRGNN.forward`), its tensor names kept so `state_dict()` matches a RecBole checkpoint's. Inputs
are RecBole's: RIGHT-padded item sequences and their lengths.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class GNN(nn.Module):
  def __init__(self, embedding_size, step=1):
    super().__init__()
    self.step = step
    self.w_ih = nn.Parameter(torch.Tensor(3 * embedding_size, 2 * embedding_size))
    self.w_hh = nn.Parameter(torch.Tensor(3 * embedding_size, embedding_size))
    self.b_ih = nn.Parameter(torch.Tensor(3 * embedding_size))
    self.b_hh = nn.Parameter(torch.Tensor(3 * embedding_size))
    self.b_iah = nn.Parameter(torch.Tensor(embedding_size))
    self.b_ioh = nn.Parameter(torch.Tensor(embedding_size))
    self.linear_edge_in = nn.Linear(embedding_size, embedding_size, bias=True)
    self.linear_edge_out = nn.Linear(embedding_size, embedding_size, bias=True)

  def cell(self, A, hidden):
    n = A.size(1)
    input_in = torch.matmul(A[:, :, :n], self.linear_edge_in(hidden)) + self.b_iah
    input_out = torch.matmul(A[:, :, n:2 * n], self.linear_edge_out(hidden)) + self.b_ioh
    gi = F.linear(torch.cat([input_in, input_out], 2), self.w_ih, self.b_ih)
    gh = F.linear(hidden, self.w_hh, self.b_hh)
    i_r, i_i, i_n = gi.chunk(3, 2)
    h_r, h_i, h_n = gh.chunk(3, 2)
    reset_gate = torch.sigmoid(i_r + h_r)
    input_gate = torch.sigmoid(i_i + h_i)
    new_gate = torch.tanh(i_n + reset_gate * h_n)
    return (1 - input_gate) * hidden + input_gate * new_gate

  def forward(self, A, hidden):
    for _ in range(self.step):
      hidden = self.cell(A, hidden)
    return hidden


class SRGNN(nn.Module):
  def __init__(self, n_items, embedding_size, step=1):
    super().__init__()
    self.item_embedding = nn.Embedding(n_items, embedding_size, padding_idx=0)
    self.gnn = GNN(embedding_size, step)
    self.linear_one = nn.Linear(embedding_size, embedding_size, bias=True)
    self.linear_two = nn.Linear(embedding_size, embedding_size, bias=True)
    self.linear_three = nn.Linear(embedding_size, 1, bias=False)
    self.linear_transform = nn.Linear(embedding_size * 2, embedding_size, bias=True)
    stdv = 1.0 / math.sqrt(embedding_size)
    for weight in self.parameters():
      weight.data.uniform_(-stdv, stdv)

  @staticmethod
  def get_slice(item_seq):
    mask = item_seq.gt(0)
    items, A, alias_inputs = [], [], []
    max_n_node = item_seq.size(1)
    for u_input in item_seq.numpy():
      node = np.unique(u_input)
      items.append(node.tolist() + (max_n_node - len(node)) * [0])
      u_A = np.zeros((max_n_node, max_n_node))
      for i in np.arange(len(u_input) - 1):
        if u_input[i + 1] == 0:
          break
        u = np.where(node == u_input[i])[0][0]
        v = np.where(node == u_input[i + 1])[0][0]
        u_A[u][v] = 1
      u_sum_in = np.sum(u_A, 0)
      u_sum_in[np.where(u_sum_in == 0)] = 1
      u_A_in = np.divide(u_A, u_sum_in)
      u_sum_out = np.sum(u_A, 1)
      u_sum_out[np.where(u_sum_out == 0)] = 1
      u_A_out = np.divide(u_A.transpose(), u_sum_out)
      A.append(np.concatenate([u_A_in, u_A_out]).transpose())
      alias_inputs.append([np.where(node == i)[0][0] for i in u_input])
    return (torch.LongTensor(alias_inputs), torch.FloatTensor(np.array(A)),
            torch.LongTensor(items), mask)

  def forward(self, item_seq, item_seq_len):
    alias_inputs, A, items, mask = self.get_slice(item_seq)
    hidden = self.gnn(A, self.item_embedding(items))
    alias_inputs = alias_inputs.view(-1, alias_inputs.size(1), 1).expand(-1, -1, hidden.size(2))
    seq_hidden = torch.gather(hidden, dim=1, index=alias_inputs)
    ht = seq_hidden[torch.arange(len(item_seq)), item_seq_len - 1]
    q1 = self.linear_one(ht).view(ht.size(0), 1, ht.size(1))
    q2 = self.linear_two(seq_hidden)
    alpha = self.linear_three(torch.sigmoid(q1 + q2))
    a = torch.sum(alpha * seq_hidden * mask.view(mask.size(0), -1, 1).float(), 1)
    return self.linear_transform(torch.cat([a, ht], dim=1))
