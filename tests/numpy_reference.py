"""Independent float64 NumPy implementations, written from
``shared/docs/reference-conventions.md`` (not from calib_jax), used as oracles.

Deliberately loop-based and literal: one bin / one class / one pair at a time,
the way the reference's PyTorch modules are written.
"""

import numpy as np

EDGES_15 = np.array([
    0.0, 0.06666667014360428, 0.13333334028720856, 0.20000001788139343,
    0.2666666805744171, 0.3333333432674408, 0.40000003576278687, 0.46666669845581055,
    0.5333333015441895, 0.5999999642372131, 0.6666666269302368, 0.7333333492279053,
    0.800000011920929, 0.8666666746139526, 0.9333333373069763, 1.0], dtype=np.float32)


def softmax64(logits):
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def log_softmax64(logits):
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


# ---------------------------------------------------------------- losses


def cross_entropy(logits, labels):
    lp = log_softmax64(logits)
    return np.array([-lp[i, y] for i, y in enumerate(labels)])


def focal(logits, labels, gamma):
    lp = log_softmax64(logits)
    out = []
    for i, y in enumerate(labels):
        p = np.exp(lp[i, y])
        factor = 1.0 if gamma == 0 else (1.0 - p) ** gamma
        out.append(-factor * lp[i, y])
    return np.array(out)


def flsd_gamma(p_t32, gamma=3.0, thresholds=(0.2, 0.5), gammas=(5.0, 3.0)):
    # The reference's loop: p_t >= 0.5 -> self.gamma; else first key k with p_t < k.
    if p_t32 >= thresholds[-1]:
        return gamma
    for k, g in zip(thresholds, gammas):
        if p_t32 < k:
            return g
    return gamma


def adaptive_focal(logits, labels, gamma=3.0, thresholds=(0.2, 0.5), gammas=(5.0, 3.0)):
    lp = log_softmax64(logits)
    # The tier is decided on the float32 p_t, as the reference does.
    lp32 = np.asarray(logits, np.float32)
    lp32 = lp32 - lp32.max(1, keepdims=True)
    lp32 = lp32 - np.log(np.exp(lp32).sum(1, keepdims=True))
    out = []
    for i, y in enumerate(labels):
        g = flsd_gamma(float(np.float32(np.exp(lp32[i, y]))), gamma, thresholds, gammas)
        p = np.exp(lp[i, y])
        out.append(-((1.0 - p) ** g) * lp[i, y])
    return np.array(out)


def brier(logits, labels):
    p = softmax64(logits)
    out = []
    for i, y in enumerate(labels):
        t = np.zeros(p.shape[1])
        t[y] = 1.0
        out.append(np.sum((t - p[i]) ** 2))
    return np.array(out)


def label_smoothing(logits, labels, eps):
    lp = log_softmax64(logits)
    c = lp.shape[1]
    out = []
    for i, y in enumerate(labels):
        t = np.full(c, eps / (c - 1))
        t[y] = 1.0 - eps
        out.append(-np.sum(t * lp[i]))
    return np.array(out)


def _top(logits, labels):
    p = softmax64(logits)
    r = p.max(axis=1)
    c = (p.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    return r, c


def mmce(logits, labels):
    r, c = _top(logits, labels)
    n = len(r)
    total = 0.0
    for i in range(n):
        for j in range(n):
            total += (c[i] - r[i]) * (c[j] - r[j]) * np.exp(-abs(r[i] - r[j]) / 0.4)
    return total / n ** 2


def mmce_weighted(logits, labels):
    r, c = _top(logits, labels)
    correct = r[c == 1]
    wrong = r[c == 0]
    m, n = len(correct), len(wrong)
    if m == 0 or n == 0:
        return 0.0

    def block_mean(a, wa, b, wb):
        vals = [wa[i] * wb[j] * np.exp(-abs(a[i] - b[j]) / 0.4)
                for i in range(len(a)) for j in range(len(b))]
        return np.mean(vals)

    cc = block_mean(correct, 1 - correct, correct, 1 - correct)
    ii = block_mean(wrong, wrong, wrong, wrong)
    ci = block_mean(correct, 1 - correct, wrong, wrong)
    mmd = cc / (m * m + 1e-5) + ii / (n * n + 1e-5) - 2 * ci / (m * n + 1e-5)
    return np.sqrt(mmd + 1e-10)


# ---------------------------------------------------------------- metrics


def _binned_error(values32, hits, lowers, uppers, n_total):
    """sum over bins of prop * |mean value - mean hit|, and the max gap."""
    ece, mce = 0.0, 0.0
    for lo, hi in zip(lowers, uppers):
        in_bin = (values32 > np.float32(lo)) & (values32 <= np.float32(hi))
        if in_bin.sum() > 0:
            gap = abs(values32[in_bin].astype(np.float64).mean() - hits[in_bin].mean())
            ece += gap * in_bin.sum() / n_total
            mce = max(mce, gap)
    return ece, mce


def top_label(logits, labels):
    p = softmax64(logits)
    conf32 = p.max(axis=1).astype(np.float32)
    hits = (p.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    return conf32, hits


def ece_mce(logits, labels, edges=EDGES_15):
    conf32, hits = top_label(logits, labels)
    return _binned_error(conf32, hits, edges[:-1], edges[1:], len(hits))


def adaptive_ece(logits, labels, num_bins=15):
    conf32, hits = top_label(logits, labels)
    n = len(conf32)
    edges = np.interp(np.linspace(0, n, num_bins + 1), np.arange(n),
                      np.sort(conf32.astype(np.float64)))
    return _binned_error(conf32, hits, edges[:-1], edges[1:], n)[0]


def classwise_ece(logits, labels, edges=EDGES_15):
    p = softmax64(logits)
    labels = np.asarray(labels)
    k = int(labels.max()) + 1
    per_class = []
    for cls in range(k):
        values32 = p[:, cls].astype(np.float32)
        hits = (labels == cls).astype(np.float64)
        per_class.append(_binned_error(values32, hits, edges[:-1], edges[1:], len(labels))[0])
    return float(np.mean(per_class))


def nll(logits, labels):
    return float(np.mean(cross_entropy(logits, labels)))


def accuracy(logits, labels):
    return float(np.mean(softmax64(logits).argmax(1) == np.asarray(labels)))


def temperature_search(logits, labels, criterion="ece"):
    """The reference's set_temperature_cv loop."""
    best_nll, best_ece = 10 ** 7, 10 ** 7
    t_nll = t_ece = None
    t = 0.1
    curve = []
    for _ in range(100):
        scaled = np.asarray(logits, np.float32) / np.float32(t)
        v_nll = nll(scaled, labels)
        v_ece = ece_mce(scaled, labels)[0]
        curve.append((t, v_ece, v_nll))
        if best_nll > v_nll:
            t_nll, best_nll = t, v_nll
        if best_ece > v_ece:
            t_ece, best_ece = t, v_ece
        t += 0.1
    return (t_ece if criterion == "ece" else t_nll), curve


# ---------------------------------------------------------------- OOD


def entropy(logits):
    p = softmax64(logits)
    lp = log_softmax64(logits)
    return -np.sum(p * lp, axis=1)


def auroc(pos, neg):
    """P(pos > neg) + 1/2 P(pos == neg), by brute force over all pairs."""
    pos = np.asarray(pos, np.float64)[:, None]
    neg = np.asarray(neg, np.float64)[None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def ece_sweep(conf, hits, order=1.0):
    """Roelofs et al.'s Algorithm 1 by brute force: (ECE_sweep, b*) of top-label confidences
    ``conf`` and 0/1 ``hits``; bins by np.array_split of the stably sorted confidences."""
    sort = np.argsort(np.asarray(conf), kind="stable")
    conf = np.asarray(conf, np.float64)[sort]
    hits = np.asarray(hits, np.float64)[sort]
    n, best = len(conf), 1
    for b in range(2, n + 1):
        acc = [h.sum() / len(h) for h in np.array_split(hits, b)]
        if any(later < earlier for earlier, later in zip(acc, acc[1:])):
            break
        best = b
    gaps = [len(c) / n * abs(c.mean() - h.mean()) ** order
            for c, h in zip(np.array_split(conf, best), np.array_split(hits, best))]
    return sum(gaps) ** (1.0 / order), best
