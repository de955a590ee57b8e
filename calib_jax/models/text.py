"""The paper's two text models: a global-pooling CNN (20 Newsgroups) and a
binary constituency Tree-LSTM (SST), from the reference's ``nlp`` branch.

Both take integer token ids and own an embedding table whose source is a
parameter: ``embeddings=None`` gives a trainable ``N(0, 1)`` table of
``vocab_size x embed_dim`` (PyTorch's default, what to use when GloVe is not
available offline); passing a ``[vocab_size, embed_dim]`` array (e.g. GloVe
vectors) starts from it, and ``train_embeddings=False`` keeps it fixed, as the
reference does with GloVe.

Trees are given as arrays so that a batch is one jitted computation: nodes in
post-order (children before parents), padded to a common length.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from calib_jax.models.layers import TorchDense, normal, torch_bias_init, torch_kernel_init


class _Embedding(nn.Module):
    vocab_size: int
    embed_dim: int
    embeddings: Any = None
    train_embeddings: bool = True

    @nn.compact
    def __call__(self, tokens):
        if self.embeddings is not None:
            table = np.asarray(self.embeddings, np.float32)
            if table.shape != (self.vocab_size, self.embed_dim):
                raise ValueError(
                    f"`embeddings` must have shape ({self.vocab_size}, {self.embed_dim}), got "
                    f"{table.shape}.")
            init = lambda key, shape, dtype=jnp.float32: jnp.asarray(table, dtype)  # noqa: E731
        else:
            init = normal(1.0)
        weights = self.param("embedding", init, (self.vocab_size, self.embed_dim), jnp.float32)
        if not self.train_embeddings:
            weights = jax.lax.stop_gradient(weights)
        return jnp.take(weights, tokens, axis=0)


class GlobalPoolingCNN(nn.Module):
    """Reference ``NewsGroup/ng_model.py``: three Conv1d(128, 5) with ReLU, max-pool
    (5, stride 1) after the first two, global max-pool, fc 128 -> ReLU ->
    dropout -> fc ``num_classes``. Input ``[B, L]`` token ids, ``L >= 21``
    (the reference pads / truncates to 1000)."""
    num_classes: int = 20
    vocab_size: int = 20000
    embed_dim: int = 100
    channels: int = 128
    keep_prob: float = 0.7
    embeddings: Any = None
    train_embeddings: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens, train: bool = False):
        if tokens.ndim != 2 or tokens.shape[1] < 21:
            raise ValueError(f"`tokens` must have shape [batch, length >= 21] (three width-5 "
                             f"convolutions and two width-5 poolings), got {tokens.shape}.")
        x = _Embedding(self.vocab_size, self.embed_dim, self.embeddings,
                       self.train_embeddings)(tokens).astype(self.dtype)

        def conv(h):
            fan_in = h.shape[-1] * 5
            return nn.Conv(self.channels, (5,), padding="VALID", dtype=self.dtype,
                           param_dtype=jnp.float32, kernel_init=torch_kernel_init,
                           bias_init=torch_bias_init(fan_in))(h)

        x = nn.max_pool(nn.relu(conv(x)), (5,), (1,))
        x = nn.max_pool(nn.relu(conv(x)), (5,), (1,))
        x = jnp.max(nn.relu(conv(x)), axis=1)
        x = nn.relu(TorchDense(self.channels, dtype=self.dtype)(x))
        x = nn.Dropout(1.0 - self.keep_prob, deterministic=not train)(x)
        return TorchDense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class Trees(NamedTuple):
    """A batch of binary trees as arrays, nodes in post-order.

    Attributes:
      tokens: ``[B, M]`` token id of each leaf node (ignored for inner nodes).
      left, right: ``[B, M]`` child node indices of inner nodes, -1 for leaves.
      root: ``[B]`` index of the root node (the last real node).
      num_nodes: ``[B]`` real nodes; the rest is padding.
      labels: ``[B, M]`` each node's class (the targets of phrase-level training),
        -1 for padding; or None.
    """
    tokens: Any
    left: Any
    right: Any
    root: Any
    num_nodes: Any
    labels: Any = None


class NodeLogits(NamedTuple):
    """What :class:`BinaryTreeLSTM` returns in training with ``phrase_labels=True``:
    ``logits`` ``[B, C_root]`` (the sentence's, as in evaluation: accuracy is counted on
    them), ``node_logits`` ``[B, M, C]`` (every node's, over all the head's classes) and
    ``node_labels`` ``[B, M]`` (the nodes' targets from the packed trees, -1 where a node
    has none). :func:`calib_jax.train.batch_loss` puts the loss on every labelled node."""
    logits: Any
    node_logits: Any
    node_labels: Any


def parse_ptb_tree(text: str):
    """Parses ``(3 (2 a) (4 (2 b) (3 c)))`` into ``(label, tokens, left, right, labels)``.

    Nodes are returned in post-order (the root last); a leaf has ``left = right = -1``
    and its word in ``tokens``; inner nodes have ``None`` there. ``labels`` holds each
    node's label (``label`` is the root's). Unary chains (a label over a single subtree)
    are collapsed onto the child, as binary Tree-LSTMs expect; the collapsed node keeps
    the outermost label, so that the root keeps the sentence's (SST has no such chains).
    Raises ``ValueError`` on unbalanced or non-binary trees.
    """
    pos = 0
    text = text.strip()

    def skip():
        nonlocal pos
        while pos < len(text) and text[pos] == " ":
            pos += 1

    words, lefts, rights, labels = [], [], [], []

    def node():
        nonlocal pos
        skip()
        if pos >= len(text) or text[pos] != "(":
            raise ValueError(f"expected '(' at {pos} in {text[:60]!r}")
        pos += 1
        end = pos
        while text[end] not in " ()":
            end += 1
        label = int(text[pos:end])
        pos = end
        skip()
        children = []
        if text[pos] == "(":
            while text[pos] == "(":
                children.append(node())
                skip()
        else:
            end = pos
            while text[end] != ")":
                end += 1
            word = text[pos:end]
            pos = end
            words.append(word)
            lefts.append(-1)
            rights.append(-1)
            labels.append(label)
            children = None
        if text[pos] != ")":
            raise ValueError(f"expected ')' at {pos} in {text[:60]!r}")
        pos += 1
        if children is None:
            return label, len(words) - 1
        if len(children) == 1:
            labels[children[0][1]] = label  # the chain's outermost label
            return label, children[0][1]
        if len(children) != 2:
            raise ValueError(f"node with {len(children)} children in {text[:60]!r}")
        words.append(None)
        lefts.append(children[0][1])
        rights.append(children[1][1])
        labels.append(label)
        return label, len(words) - 1

    try:
        label, _ = node()
    except IndexError:
        raise ValueError(f"unbalanced parentheses in {text[:60]!r}") from None
    if text[pos:].strip():
        raise ValueError(f"trailing text after the tree in {text[:60]!r}")
    return label, words, lefts, rights, labels


def make_trees(parsed, vocab: dict, max_nodes: int | None = None, unk: int = 0,
               node_classes: dict | None = None) -> Trees:
    """Stacks parsed trees (from :func:`parse_ptb_tree`) into padded :class:`Trees`.

    ``node_classes`` maps a node's label to its class (e.g. SST's 0-4 sentiment to
    negative / neutral / positive) and fills :attr:`Trees.labels`; None leaves it None.
    """
    max_nodes = max_nodes or max(len(p[1]) for p in parsed)
    b = len(parsed)
    tokens = np.zeros((b, max_nodes), np.int32)
    left = np.full((b, max_nodes), -1, np.int32)
    right = np.full((b, max_nodes), -1, np.int32)
    labels = np.full((b, max_nodes), -1, np.int32)
    num = np.zeros(b, np.int32)
    for i, (_, words, lefts, rights, node_labels) in enumerate(parsed):
        n = len(words)
        if n > max_nodes:
            raise ValueError(f"tree {i} has {n} nodes, more than max_nodes={max_nodes}.")
        tokens[i, :n] = [vocab.get(w, unk) if w is not None else 0 for w in words]
        left[i, :n], right[i, :n], num[i] = lefts, rights, n
        if node_classes is not None:
            labels[i, :n] = [node_classes[label] for label in node_labels]
    return Trees(tokens, left, right, num - 1, num,
                 labels if node_classes is not None else None)


class _TreeStep(nn.Module):
    """One post-order step: the state of node ``k`` for every tree of the batch."""
    mem_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, xs):
        c_all, h_all = carry
        k, left, right, leaf_c, leaf_h = xs
        is_leaf = (left < 0)[:, None]

        def child(states, index):
            return jnp.take_along_axis(states, jnp.maximum(index, 0)[:, None, None], 1)[:, 0]

        lc, lh, rc, rh = child(c_all, left), child(h_all, left), child(c_all, right), child(h_all, right)
        pre = [TorchDense(self.mem_dim, dtype=self.dtype, name=f"{g}_left")(lh)
               + TorchDense(self.mem_dim, dtype=self.dtype, name=f"{g}_right")(rh)
               for g in ("i", "lf", "rf", "u")]
        i, lf, rf = (jax.nn.sigmoid(p) for p in pre[:3])
        c_inner = i * jnp.tanh(pre[3]) + lf * lc + rf * rc
        c = jnp.where(is_leaf, leaf_c, c_inner)
        h = jnp.where(is_leaf, leaf_h, jnp.tanh(c_inner))
        c_all = jax.lax.dynamic_update_index_in_dim(c_all, c, k, axis=1)
        h_all = jax.lax.dynamic_update_index_in_dim(h_all, h, k, axis=1)
        return (c_all, h_all), None


def pack_trees(trees: Trees) -> np.ndarray:
    """Trees as one int32 ``[B, 3, M]`` array (tokens, left, right; padding nodes have
    ``left = -2``), ``[B, 4, M]`` with node labels, so that a data pipeline can gather
    them like images."""
    left = np.array(trees.left)
    m = left.shape[1]
    left[np.arange(m)[None, :] >= np.asarray(trees.num_nodes)[:, None]] = -2
    rows = [np.asarray(trees.tokens), left, np.asarray(trees.right)]
    if trees.labels is not None:
        rows.append(np.asarray(trees.labels))
    return np.stack(rows, axis=1).astype(np.int32)


def unpack_trees(packed) -> Trees:
    """Inverse of :func:`pack_trees` (works on traced arrays)."""
    if packed.ndim != 3 or packed.shape[1] not in (3, 4):
        raise ValueError(f"packed trees must have shape [batch, 3 or 4, nodes] (pack_trees), "
                         f"got {packed.shape}.")
    tokens, left, right = packed[:, 0], packed[:, 1], packed[:, 2]
    num = jnp.sum(left != -2, axis=1).astype(jnp.int32)
    labels = packed[:, 3] if packed.shape[1] == 4 else None
    return Trees(tokens, jnp.where(left == -2, -1, left), right, num - 1, num, labels)


class BinaryTreeLSTM(nn.Module):
    """Reference ``treeLSTM/model.py`` (constituency): leaves ``c = W_c x``,
    ``h = sigmoid(W_o x) * tanh(c)``; inner nodes gate their two children,
    ``c = i * u + f_l * c_l + f_r * c_r``, ``h = tanh(c)``; every node's ``h``
    goes through dropout and a linear layer of ``num_classes`` outputs.

    Returns the root's logits ``[B, C_root]``: the head's columns ``root_classes``
    (all of them when None). The reference's SST binary model has three outputs
    (negative, neutral, positive: its phrases include neutral ones) and reads a sentence
    as negative or positive: ``num_classes=3, root_classes=(0, 2)``. With
    ``phrase_labels=True`` a training call (``train=True``) returns :class:`NodeLogits`
    instead, the nodes' targets taken from the packed trees' label row, so that the loss
    goes on every labelled phrase, as the reference trains. ``all_nodes=True`` returns
    every node's logits ``[B, M, C]``.
    Input: :class:`Trees`, or their packed ``[B, 3 or 4, M]`` array.
    The nodes are visited by one ``nn.scan`` (compiled once for any depth)."""
    num_classes: int = 2
    vocab_size: int = 20000
    embed_dim: int = 300
    mem_dim: int = 150  # the reference's constituency model (sst_train.py)
    dropout: float = 0.5
    embeddings: Any = None
    train_embeddings: bool = True
    root_classes: tuple | None = None
    phrase_labels: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, trees, train: bool = False, all_nodes: bool = False):
        if not isinstance(trees, Trees):  # packed [B, 3 or 4, M] (pack_trees)
            trees = unpack_trees(trees)
        if self.root_classes is not None and not (
                len(self.root_classes) >= 2
                and all(0 <= c < self.num_classes for c in self.root_classes)):
            raise ValueError(f"`root_classes` must name two or more of the {self.num_classes} "
                             f"outputs, got {self.root_classes}.")
        if self.phrase_labels and train and trees.labels is None:
            raise ValueError("`phrase_labels=True` trains on node labels: give trees with "
                             "labels (make_trees(..., node_classes=...), packed [B, 4, M]).")
        emb = _Embedding(self.vocab_size, self.embed_dim, self.embeddings,
                         self.train_embeddings)(trees.tokens).astype(self.dtype)
        leaf_c = TorchDense(self.mem_dim, dtype=self.dtype, name="leaf_c")(emb)
        leaf_h = jax.nn.sigmoid(TorchDense(self.mem_dim, dtype=self.dtype, name="leaf_o")(emb)) \
            * jnp.tanh(leaf_c)
        b, m = trees.tokens.shape
        scan = nn.scan(_TreeStep, variable_broadcast="params", split_rngs={"params": False},
                       in_axes=0, out_axes=0)
        time_major = lambda x: jnp.swapaxes(x, 0, 1)  # noqa: E731
        xs = (jnp.arange(m), time_major(trees.left), time_major(trees.right),
              time_major(leaf_c), time_major(leaf_h))
        zeros = jnp.zeros((b, m, self.mem_dim), self.dtype)
        (_, h_all), _ = scan(self.mem_dim, self.dtype, name="composer")((zeros, zeros), xs)
        head = nn.Dropout(self.dropout, deterministic=not train)
        out = TorchDense(self.num_classes, dtype=self.dtype, name="out")
        read_root = (lambda z: z) if self.root_classes is None else (  # noqa: E731
            lambda z: z[..., np.asarray(self.root_classes)])
        if all_nodes or (self.phrase_labels and train):
            # One dropout draw per node: the root's row is the sentence's prediction.
            nodes = out(head(h_all)).astype(jnp.float32)
            if all_nodes:
                return nodes
            root = jnp.take_along_axis(nodes, trees.root[:, None, None], 1)[:, 0]
            return NodeLogits(read_root(root), nodes, trees.labels)
        root_h = jnp.take_along_axis(h_all, trees.root[:, None, None], 1)[:, 0]
        return read_root(out(head(root_h)).astype(jnp.float32))
