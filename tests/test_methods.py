"""bgmask.methods: the registry (every method built, its loss differentiated, its state round-tripped),
GroupDRO against an independent numpy recurrence (weights, loss, gradient, a fake two-rank all-reduce),
the group-balanced sampler, and DFR against direct scikit-learn fits of the same subsets."""

from __future__ import annotations

from argparse import Namespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bgmask import distributed
from bgmask.args import add
from bgmask.errors import ArgumentParser, UserError
from bgmask.methods import (C_GRID, METHODS, GroupBalancedSampler, GroupDRO, build_method, create_method,
                            dfr_evaluate, dfr_fit, group_counts)

sklearn = pytest.importorskip("sklearn")
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402


# ------------------------------------------------------------------------------------- the registry

def defaults_namespace(**over) -> Namespace:
    """Every method's flags at their defaults, plus the training settings the methods read."""
    p = ArgumentParser()
    for cls in METHODS.values():
        for f in cls.flags:
            add(p, f"--{f.dest}", **f.kwargs())
    ns = p.parse_args([])
    return Namespace(**{**vars(ns), "smoothing": 0.1, "turn_on_mixup_or_cutmix": False, **over})


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_builds_trains_and_round_trips(name):
    cfg = defaults_namespace(method=name)
    method = build_method(cfg, criterion=torch.nn.CrossEntropyLoss(), group_counts=[5, 3, 2, 4])
    twin = create_method(name)
    assert method.name == name and isinstance(method.needs_groups, bool) and isinstance(method.post_hoc, bool)
    logits = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    targets, groups = torch.tensor([0, 1, 1, 0, 1, 0]), torch.tensor([0, 3, 2, 1, 3, 0])
    if method.post_hoc:
        with pytest.raises(UserError, match="post-hoc"):
            method.loss(logits, targets, groups)
    else:
        loss = method.loss(logits, targets, groups)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        assert logits.grad is not None and logits.grad.abs().sum() > 0
    twin.load_state_dict(method.state_dict())
    assert torch.equal(torch.as_tensor(twin.state_dict().get("q", 0)), torch.as_tensor(method.state_dict().get("q", 0)))
    assert twin.state_dict().keys() == method.state_dict().keys()


def test_flags_are_distinct_and_the_unknown_is_one_line():
    dests = [f.dest for cls in METHODS.values() for f in cls.flags]
    assert len(dests) == len(set(dests))
    with pytest.raises(UserError, match="unknown --method 'nope'"):
        create_method("nope")
    with pytest.raises(UserError, match="resume with the same --method"):
        create_method("erm").load_state_dict(create_method("groupdro").state_dict())


# ------------------------------------------------------------------------- GroupDRO, independently

def ref_per_sample(logits: np.ndarray, y: np.ndarray, s: float) -> np.ndarray:
    """Label-smoothed cross-entropy per sample: (1 - s) (-log p_y) + s mean_k(-log p_k)."""
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return (1 - s) * -logp[np.arange(len(y)), y] + s * -logp.mean(1)


def ref_group_means(logits, y, g, s, n):
    per = ref_per_sample(logits, y, s)
    return np.array([per[g == k].mean() if (g == k).any() else 0.0 for k in range(n)])


def ref_weights(batches, eta, adj, counts, s, n=4) -> np.ndarray:
    q = np.full(n, 1.0 / n)
    for logits, y, g in batches:
        adjusted = ref_group_means(logits, y, g, s, n) + (adj / np.sqrt(counts) if adj > 0 else 0.0)
        q = q * np.exp(eta * adjusted)
        q = q / q.sum()
    return q


def toy_batches(steps=4, size=7, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        g = rng.integers(0, 4, size)
        if t == 1:
            g[g == 3] = 2  # a batch with no sample of group 3
        out.append((rng.normal(size=(size, classes)) * 2, rng.integers(0, classes, size), g))
    return out


@pytest.mark.parametrize("adj,smoothing", [(0.0, 0.0), (2.0, 0.1)])
def test_groupdro_weights_loss_and_gradient_match_the_recurrence(adj, smoothing):
    counts, eta, batches = np.array([50.0, 7.0, 3.0, 20.0]), 0.3, toy_batches()
    assert not (batches[1][2] == 3).any()
    method = GroupDRO(eta=eta, adj=adj, group_counts=counts.tolist(), smoothing=smoothing)
    for t, (logits, y, g) in enumerate(batches):
        x = torch.tensor(logits, requires_grad=True)
        loss = method.loss(x, torch.tensor(y), torch.tensor(g))
        q = ref_weights(batches[: t + 1], eta, adj, counts, smoothing)
        np.testing.assert_allclose(method.q.numpy(), q, rtol=0, atol=1e-12)
    # the last step's loss and its gradient by hand: d loss / d logits_i = q_g / n_g (softmax_i - target_i)
    means = ref_group_means(logits, y, g, smoothing, 4)
    assert abs(loss.item() - (q * means).sum()) < 1e-12
    loss.backward()
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    target = (1 - smoothing) * np.eye(3)[y] + smoothing / 3
    n_g = np.bincount(g, minlength=4)
    np.testing.assert_allclose(x.grad.numpy(), (q[g] / n_g[g])[:, None] * (p - target), rtol=0, atol=1e-12)


def test_groupdro_absent_group_moves_only_by_renormalisation():
    method = GroupDRO(eta=1.0)
    method.loss(torch.randn(4, 2, dtype=torch.float64), torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1]))
    q = method.q.numpy()
    assert q[2] == q[3] and q[2] < 0.25  # groups 2, 3 absent: the same factor exp(0), then renormalised


def test_groupdro_per_sample_loss_is_the_smoothed_criterion():
    """With one group, GroupDRO's loss is the batch mean of the criterion build_loss makes (timm's)."""
    from timm.loss import LabelSmoothingCrossEntropy

    logits, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 5, (9,))
    one = GroupDRO(n_groups=1, smoothing=0.1).loss(logits, y, torch.zeros(9, dtype=torch.long))
    assert abs(one.item() - LabelSmoothingCrossEntropy(smoothing=0.1)(logits, y).item()) < 1e-12


def test_groupdro_two_ranks_share_q_equal_to_one_process(monkeypatch):
    """A fake all-reduce sums the two ranks' statistics (each rank's own, as a collective would): both
    ranks hold the same q, that of one process on the concatenated batches; each backpropagates its own
    per-group means weighted by that q."""
    ranks, single = [GroupDRO(eta=0.5, smoothing=0.1) for _ in range(2)], GroupDRO(eta=0.5, smoothing=0.1)
    for logits, y, g in toy_batches(steps=5, size=8, seed=3):
        halves = [(torch.tensor(logits[a:b]), torch.tensor(y[a:b]), torch.tensor(g[a:b])) for a, b in ((0, 3), (3, 8))]
        stats = [r.group_means(*h)[1] for r, h in zip(ranks, halves)]
        np.testing.assert_allclose(stats[0][1].numpy(), np.bincount(g[:3], minlength=4))
        losses = []
        for r in range(2):
            monkeypatch.setattr(distributed, "all_reduce_sum", lambda t, peer=stats[1 - r]: t + peer)
            losses.append(ranks[r].loss(*halves[r]))
        monkeypatch.undo()
        single.loss(torch.tensor(logits), torch.tensor(y), torch.tensor(g))
        assert torch.equal(ranks[0].q, ranks[1].q)
        np.testing.assert_allclose(ranks[0].q.numpy(), single.q.numpy(), rtol=0, atol=1e-12)
        for r, (lg, yy, gg) in enumerate(halves):
            means = ref_group_means(lg.numpy(), yy.numpy(), gg.numpy(), 0.1, 4)
            assert abs(losses[r].item() - (ranks[r].q.numpy() * means).sum()) < 1e-12


def test_groupdro_resume_is_exact():
    batches = toy_batches(steps=5)
    straight, first = GroupDRO(eta=0.2), GroupDRO(eta=0.2)
    for logits, y, g in batches:
        straight.loss(torch.tensor(logits), torch.tensor(y), torch.tensor(g))
    for logits, y, g in batches[:3]:
        first.loss(torch.tensor(logits), torch.tensor(y), torch.tensor(g))
    resumed = GroupDRO(eta=0.2)
    resumed.load_state_dict(first.state_dict())
    for logits, y, g in batches[3:]:
        resumed.loss(torch.tensor(logits), torch.tensor(y), torch.tensor(g))
    assert torch.equal(resumed.q, straight.q)
    with pytest.raises(UserError, match="for 4 groups, this run has 2"):
        GroupDRO(n_groups=2).load_state_dict(first.state_dict())


def test_groupdro_refusals_are_one_line():
    with pytest.raises(UserError, match="--turn_on_mixup_or_cutmix"):
        build_method(defaults_namespace(method="groupdro", turn_on_mixup_or_cutmix=True), group_counts=[1, 1, 1, 1])
    method = GroupDRO()
    with pytest.raises(UserError, match="hard class labels"):
        method.loss(torch.randn(2, 2), torch.tensor([[0.3, 0.7], [1.0, 0.0]]), torch.tensor([0, 1]))
    with pytest.raises(UserError, match="needs each sample's group"):
        method.loss(torch.randn(2, 2), torch.tensor([0, 1]), None)
    with pytest.raises(UserError, match="--gdro_adj"):
        GroupDRO(adj=1.0)
    with pytest.raises(UserError, match="no group in"):
        group_counts([0, 1, -1, 2])
    assert group_counts([0, 3, 3, 1]) == [1, 1, 0, 2]


# --------------------------------------------------------------------------- group-balanced sampling

def test_balanced_sampler_is_seeded_shared_and_balanced():
    groups = np.array([0] * 90 + [1] * 10)
    world = [GroupBalancedSampler(groups, num_replicas=3, rank=r, seed=7) for r in range(3)]
    for s in world:
        s.set_epoch(4)
    full = world[0].epoch_indices()
    assert len(full) == 102 and all(s.epoch_indices() == full for s in world)  # the same draw on every rank
    shards = [list(s) for s in world]
    assert [len(s) for s in world] == [34] * 3 and all(shards[r] == full[r::3] for r in range(3))
    assert sorted(p for r in range(3) for p in range(r, 102, 3)) == list(range(102))  # disjoint, covering
    assert full[100:] == full[:2]  # padded by repeating the start
    again = GroupBalancedSampler(groups, num_replicas=3, rank=0, seed=7)
    again.set_epoch(4)
    assert list(again) == shards[0]
    again.set_epoch(5)
    assert list(again) != shards[0]
    drawn = []
    for epoch in range(50):
        again = GroupBalancedSampler(groups, seed=1)
        again.set_epoch(epoch)
        drawn += list(again)
    assert abs(np.mean(groups[drawn] == 1) - 0.5) < 0.03  # 5000 draws: standard error 0.007
    with pytest.raises(UserError, match="known group"):
        GroupBalancedSampler([0, -1, 1])


def test_groupdro_picks_its_sampler():
    assert isinstance(GroupDRO().train_sampler([0, 1, 2, 3], 1, 0, 0), GroupBalancedSampler)
    assert GroupDRO(sampling="plain").train_sampler([0, 1, 2, 3], 1, 0, 0) is None
    assert create_method("erm").train_sampler(None, 1, 0, 0) is None


# ----------------------------------------------------------------------------------------------- DFR

def spurious_split(counts, seed):
    """2-d embeddings: dim 0 the label with heavy noise (the core feature), dim 1 the place nearly clean
    (the spurious one); group = 2 y + place, counts per group."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(4), counts)
    y, place = g // 2, g % 2
    x = np.stack([(2 * y - 1) + rng.normal(size=len(g)), (2 * place - 1) + 0.1 * rng.normal(size=len(g))], 1)
    return x, y, g


def ref_tuning(x, y, g, c_grid, seed):
    """DFR's C tuning written out: the halves, the balanced subset, the fits, the worst-group scores."""
    z = StandardScaler().fit(x).transform(x)
    rng = np.random.default_rng([seed, 0])
    perms = [rng.permutation(np.flatnonzero(g == k)) for k in range(4)]
    fit = np.concatenate([p[: len(p) - len(p) // 2] for p in perms])
    score = np.concatenate([p[len(p) - len(p) // 2:] for p in perms])
    rng, m = np.random.default_rng([seed, 1]), min((g[fit] == k).sum() for k in range(4))
    sub = np.concatenate([rng.choice(fit[g[fit] == k], m, replace=False) for k in range(4)])
    worst = []
    for C in c_grid:
        pred = LogisticRegression(l1_ratio=1.0, C=C, solver="liblinear", random_state=seed).fit(z[sub], y[sub]).predict(z[score])
        worst.append(min(np.mean(pred[g[score] == k] == y[score][g[score] == k]) for k in range(4)))
    return worst


def test_dfr_matches_direct_fits_and_beats_plain_logistic_regression():
    train_x, train_y, train_g = spurious_split([400, 20, 20, 400], seed=0)
    val_x, val_y, val_g = spurious_split([60, 30, 25, 70], seed=1)
    test_x, test_y, test_g = spurious_split([200] * 4, seed=2)
    grid = (1.0, 0.1, 0.01, 0.001)
    model = dfr_fit(val_x, val_y, val_g, c_grid=grid, n_retrains=3, seed=5)
    worst = ref_tuning(val_x, val_y, val_g, grid, seed=5)
    assert [row["worst_group_acc"] for row in model.tuning] == worst
    assert model.C == grid[int(np.argmax(worst))]
    scaler = StandardScaler().fit(val_x)
    z, coefs, intercepts = scaler.transform(val_x), [], []
    for r in range(3):
        rng = np.random.default_rng([5, 2, r])
        sub = np.concatenate([rng.choice(np.flatnonzero(val_g == k), 25, replace=False) for k in range(4)])
        clf = LogisticRegression(l1_ratio=1.0, C=model.C, solver="liblinear", random_state=5).fit(z[sub], val_y[sub])
        coefs.append(clf.coef_)
        intercepts.append(clf.intercept_)
    np.testing.assert_allclose(model.coef, np.mean(coefs, 0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(model.intercept, np.mean(intercepts, 0), rtol=0, atol=1e-10)
    clf.coef_, clf.intercept_ = model.coef, model.intercept
    np.testing.assert_array_equal(model.predict(test_x), clf.predict(scaler.transform(test_x)))
    metrics = dfr_evaluate(model, test_x, test_y, test_g, prefix="dfr_test")
    plain = LogisticRegression().fit(train_x, train_y).predict(test_x)
    plain_worst = min(np.mean(plain[test_g == k] == test_y[test_g == k]) for k in range(4))
    assert metrics["dfr_test/worst_group_acc"] > plain_worst + 0.2
    accs = [metrics[f"dfr_test/group_{k}_acc"] for k in range(4)]
    assert metrics["dfr_test/worst_group_acc"] == min(accs) and metrics["dfr_test/mean_group_acc"] == np.mean(accs)
    assert metrics["dfr_test/acc"] == np.mean(model.predict(test_x) == test_y)


def test_dfr_method_carries_its_settings():
    method = build_method(defaults_namespace(method="dfr", dfr_retrains=2, dfr_seed=3))
    assert method.post_hoc and method.needs_groups and method.c_grid == C_GRID and method.n_retrains == 2
    x, y, g = spurious_split([20, 10, 10, 20], seed=0)
    assert method.fit(x, y, g).coef.shape == (1, 2)


def test_dfr_bad_inputs_are_one_line(monkeypatch):
    x, y, g = spurious_split([20, 10, 10, 20], seed=0)
    keep = g != 3
    with pytest.raises(UserError, match=r"no sample of group\(s\) \[3\]"):
        dfr_fit(x[keep], y[keep], g[keep])
    with pytest.raises(UserError, match="group 1 has 1 sample"):
        dfr_fit(*spurious_split([5, 1, 4, 5], seed=0))
    with pytest.raises(UserError, match="binary labels"):
        dfr_fit(x, np.arange(len(y)) % 3, g)
    with pytest.raises(UserError, match="finite"):
        dfr_fit(np.full_like(x, np.nan), y, g)
    line = "DFR needs a non-empty --dfr_c_grid of values > 0, --dfr_retrains >= 1 and --dfr_seed >= 0; got "
    for kwargs, got in ((dict(c_grid=()), "[], 10, 0"), (dict(c_grid=(1.0, 0.0)), "[1.0, 0.0], 10, 0"),
                        (dict(n_retrains=0), "[1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01], 0, 0"),
                        (dict(seed=-1), "[1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01], 10, -1")):
        for fit in (lambda: dfr_fit(x, y, g, **kwargs), lambda: METHODS["dfr"](**kwargs)):
            with pytest.raises(UserError) as e:  # the function and the method refuse alike, before any fit
                fit()
            assert str(e.value) == line + got
    monkeypatch.setattr("bgmask.errors.has_package", lambda name: False)
    with pytest.raises(UserError, match=r"bgmask\[dfr\]"):
        dfr_fit(x, y, g)


# --------------------------------------------------------------------------------------- embeddings

class Records(torch.utils.data.Dataset):
    def __init__(self, n=5, size=64, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.images, self.masks = torch.randn(n, 3, size, size, generator=gen), torch.ones(n, 1, size, size)
        self.masks[:, :, :32] = 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "mask": self.masks[i], "label": i % 2, "group": i % 4, "place": i % 2,
                "index": i}


@pytest.mark.parametrize("arch,strategy", [("bgmask_resnet_tiny", "baseline"), ("bgmask_resnet_tiny", "late"),
                                           ("bgmask_vit_tiny", "baseline")])
def test_embed_takes_what_the_last_linear_layer_reads(arch, strategy):
    from bgmask.distributed import DistInfo
    from bgmask.masking import create_strategy
    from bgmask.methods.features import embed, last_linear
    from bgmask.models import create_classifier

    torch.manual_seed(0)
    model, data, strat = create_classifier(arch, 2, image_size=64), Records(), create_strategy(strategy)
    feats, labels, groups = embed(model, data, strat, DistInfo(), batch_size=2)
    assert np.array_equal(labels, np.arange(5) % 2) and np.array_equal(groups, np.arange(5) % 4)
    with torch.no_grad():
        logits = strat.forward(model.eval(), data.images, data.masks)
        fc = last_linear(model)
        assert feats.shape == (5, fc.in_features)
        again = torch.from_numpy(feats) @ fc.weight.T + fc.bias
    torch.testing.assert_close(again, logits, rtol=1e-4, atol=1e-5)
