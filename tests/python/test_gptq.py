"""Error-compensated assignment (edkm.gptq): the blocked Cholesky algorithm against the naive
Optimal Brain Surgeon loop in float64, its output error against nearest rounding, outliers,
LUT groups, and the palettized model it writes (hard weight, finalize, save/load, training)."""

import pytest
import torch
from torch import nn

import edkm
from edkm.gptq import gptq_, gptq_quantize, input_hessians, output_error


def correlated_inputs(n, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols**0.5
    base = torch.randn(n, cols, generator=g, dtype=torch.float64)
    return base + 2.0 * base @ mix  # strongly correlated columns


def sorted_luts(groups, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(groups, k, generator=g, dtype=torch.float64).sort(dim=1).values


def naive_obs(w, h, luts, outliers=None, damp=0.01, act_order=True):
    """Column by column with the explicit inverse Hessian: quantize column j, spread its error
    over the remaining columns with H^-1[j, :] / H^-1[j, j], then remove j from H^-1 (the OBS
    update GPTQ's Cholesky form computes)."""
    rows, cols = w.shape
    w = w.clone().double()
    h = h.clone().double()
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    exact = torch.zeros(rows, cols, dtype=torch.bool)
    if outliers is not None:
        exact.view(-1)[outliers] = True
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(cols)
    row_luts = luts.repeat_interleave(rows // luts.shape[0], dim=0)
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    remaining = list(order.tolist())
    for j in order.tolist():
        remaining.remove(j)
        col = w[:, j]
        near = row_luts.gather(1, (col[:, None] - row_luts).abs().argmin(1, keepdim=True))[:, 0]
        qc = torch.where(exact[:, j], col, near)
        q[:, j] = qc
        e = (col - qc) / hinv[j, j]
        for r in remaining:
            w[:, r] -= e * hinv[j, r]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return q


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("block_size", [1, 5, 128])
def test_blocked_cholesky_equals_naive_obs(act_order, block_size):
    rows, cols = 12, 23
    x = correlated_inputs(200, cols)
    h = x.T @ x
    g = torch.Generator().manual_seed(3)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    luts = sorted_luts(3, 4)
    outliers = torch.tensor([0, 7, 40, 100, 275])
    q, damp = gptq_quantize(w, h, luts, outliers=outliers, block_size=block_size, act_order=act_order)
    ref = naive_obs(w, h, luts, outliers, act_order=act_order)
    assert damp == 0.01
    # Same algorithm, two float64 forms (explicit inverse with rank-1 downdates vs the Cholesky
    # factor, blocked): they differ by summation order only; a wrong update moves q by a LUT step.
    torch.testing.assert_close(q, ref, rtol=1e-10, atol=1e-10)


def test_every_weight_on_its_rows_lut_and_outliers_off_it():
    rows, cols, groups = 16, 20, 4
    x = correlated_inputs(100, cols, seed=5)
    w = torch.randn(rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    luts = sorted_luts(groups, 8, seed=7)
    outliers = torch.tensor([3, 50, 201])
    q, _ = gptq_quantize(w, x.T @ x, luts, outliers=outliers)
    flat = q.reshape(-1)
    mask = torch.ones(rows * cols, dtype=torch.bool)
    mask[outliers] = False
    for r in range(rows):
        lut = luts[r // (rows // groups)]
        row = q[r]
        on = (row[:, None] == lut[None, :]).any(1)
        off_positions = [c for c in range(cols) if not mask[r * cols + c]]
        assert on[[c for c in range(cols) if mask[r * cols + c]]].all()
        for c in off_positions:  # compensated: an outlier takes its updated, not its original, value
            assert not (row[c] == lut).any()
    assert torch.isfinite(flat).all()


def test_diagonal_hessian_is_nearest_rounding():
    # Uncorrelated inputs: nothing to compensate, GPTQ is nearest rounding exactly.
    rows, cols = 10, 17
    w = torch.randn(rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    luts = sorted_luts(2, 4)
    h = torch.diag(torch.rand(cols, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) + 0.5)
    q, _ = gptq_quantize(w, h, luts)
    row_luts = luts.repeat_interleave(rows // 2, 0)
    near = row_luts.gather(1, (w[..., None] - row_luts[:, None, :]).abs().argmin(-1))
    # Exact: with a diagonal H nothing propagates and each weight is compared with the same LUT.
    torch.testing.assert_close(q, near, rtol=0, atol=0)


def test_output_error_well_below_nearest_rounding_on_correlated_inputs():
    rows, cols = 64, 48
    x = correlated_inputs(2000, cols, seed=11)
    h = x.T @ x
    w = torch.randn(rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    luts = sorted_luts(1, 8, seed=13)
    q, _ = gptq_quantize(w, h, luts)
    row_luts = luts.repeat_interleave(rows, 0)
    near = row_luts.gather(1, (w[..., None] - row_luts[:, None, :]).abs().argmin(-1))
    assert output_error(w, q, h) < 0.7 * output_error(w, near, h)


def test_dead_inputs_and_rank_deficient_hessian():
    rows, cols = 6, 10
    x = correlated_inputs(4, cols)  # 4 samples: rank 4 < 10
    x[:, 2] = 0  # an input that never fires
    w = torch.randn(rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    q, damp = gptq_quantize(w, x.T @ x, sorted_luts(1, 4), damp=0.0)
    assert torch.isfinite(q).all() and damp > 0  # the damping grew until H was invertible


def test_bad_inputs_name_the_argument():
    w = torch.randn(4, 6, dtype=torch.float64)
    luts = sorted_luts(2, 4)
    with pytest.raises(ValueError, match="hessian must be \\[6, 6\\]"):
        gptq_quantize(w, torch.eye(5, dtype=torch.float64), luts)
    with pytest.raises(ValueError, match="3 LUT groups do not divide"):
        gptq_quantize(w, torch.eye(6, dtype=torch.float64), sorted_luts(3, 4))
    with pytest.raises(ValueError, match="damp must be"):
        gptq_quantize(w, torch.eye(6, dtype=torch.float64), luts, damp=-1)
    with pytest.raises(ValueError, match="block_size must be"):
        gptq_quantize(w, torch.eye(6, dtype=torch.float64), luts, block_size=0)
    h = torch.eye(6, dtype=torch.float64)
    h[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        gptq_quantize(w, h, luts)


class TinyLM(nn.Module):
    """Embedding -> two Linear -> lm_head tied to the embedding."""

    def __init__(self, vocab=40, dim=16, hidden=24, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, input_ids):
        h = self.embed(input_ids)
        h = h + self.down(torch.tanh(self.up(h)))
        return self.lm_head(h)


def test_input_hessians_sum_xxT_per_linear():
    m = TinyLM()
    ids = torch.randint(0, 40, (3, 2, 5), generator=torch.Generator().manual_seed(0))
    hs = input_hessians(m, ids, progress=False)
    assert set(hs) == {"up", "down", "lm_head"}
    x = m.embed(ids.reshape(-1)).detach().double()
    # float64 sums of the same products, per batch then added vs all at once: summation order only.
    torch.testing.assert_close(hs["up"], x.T @ x, rtol=1e-12, atol=1e-12)
    assert m.training  # left as it was


def test_gptq_on_a_palettized_model_lowers_the_output_error_and_survives_save(tmp_path):
    m = TinyLM()
    ids = torch.randint(0, 40, (8, 4, 12), generator=torch.Generator().manual_seed(1))
    hs = input_hessians(m, ids, progress=False)
    edkm.palettize_(m, edkm.Config(bits=2, group_size=4, outlier_fraction=0.02, outlier_criterion="magnitude"))
    m.eval()
    before = {n: mod._hard_weight().clone() for n, mod in (("up", m.up), ("down", m.down))}
    src = {n: mod.edkm_source().detach().double().clone() for n, mod in (("up", m.up), ("down", m.down))}
    stats = gptq_(m, hs)
    assert set(stats) == {"up", "down", "embed"}  # the tied weight is compensated through lm_head
    for name, s in stats.items():
        assert s.gptq_error <= s.nearest_error
    for name, mod in (("up", m.up), ("down", m.down)):
        hard = mod._hard_weight()
        # The written weight is its own hard assignment: eval forward, finalize and the file agree.
        torch.testing.assert_close(hard.double(), mod.weight.detach().double(), rtol=0, atol=0)
        assert not torch.equal(hard, before[name])
        h = hs[name]
        assert output_error(src[name], hard, h) == pytest.approx(stats[name].gptq_error, rel=1e-9)
    chosen = {n: mod.edkm_indices().clone() for n, mod in (("up", m.up), ("down", m.down), ("embed", m.embed))}
    edkm.finalize(m)  # rounds the LUTs to fp16; every weight keeps the centroid GPTQ gave it
    for n, mod in (("up", m.up), ("down", m.down), ("embed", m.embed)):
        assert torch.equal(mod.edkm_indices(), chosen[n])
    path = tmp_path / "m.safetensors"
    edkm.save(m, str(path), plain_dtype="keep")  # the biases as they are (float32)
    fresh = TinyLM(seed=5)
    edkm.load(str(path), fresh)
    # The file holds exactly the finalized weights and float32 biases: the same model, bit for bit.
    torch.testing.assert_close(fresh(ids[0]).detach(), m(ids[0]).detach(), rtol=0, atol=0)


def test_gptq_then_training_steps():
    m = TinyLM()
    ids = torch.randint(0, 40, (4, 2, 8), generator=torch.Generator().manual_seed(2))
    hs = input_hessians(m, ids, progress=False)
    edkm.palettize_(m, edkm.Config(bits=3))
    gptq_(m, hs)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m.train()
    losses = []
    for step in range(3):
        logits = m(ids[step % 4])
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 40), ids[step % 4][:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert m.up.edkm_step == 3


def test_gptq_bad_inputs():
    m = TinyLM()
    with pytest.raises(ValueError, match="no clustered modules"):
        gptq_(m, {})
    edkm.palettize_(m, edkm.Config(bits=2))
    with pytest.raises(ValueError, match="names no module"):
        gptq_(m, {"nope": torch.eye(16)})
    with pytest.raises(ValueError, match=r"must be a \[16, 16\] tensor"):
        gptq_(m, {"up": torch.eye(3)})


def test_compress_model_gptq_uses_teacher_samples_without_texts():
    from transformers import LlamaConfig, LlamaForCausalLM

    from edkm.recipe import compress_model

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=128,
    )
    m = LlamaForCausalLM(cfg).float().eval()
    res = compress_model(
        m, None, edkm.Config(bits=2), gptq=True, gptq_batches=2, calibration_block_len=16, progress=False
    )
    assert len(res.gptq) == 2 * 7 + 1  # every Linear of both layers and the tied embedding
    assert all(s.gptq_error <= s.nearest_error for s in res.gptq.values())
    assert "hessians" in res.seconds and "gptq" in res.seconds
    with pytest.raises(ValueError, match="gptq must be True or False"):
        compress_model(LlamaForCausalLM(cfg), None, edkm.Config(bits=2), gptq="yes")


def test_refit_luts_is_the_least_squares_solution():
    from edkm.gptq import refit_luts

    rows, cols, groups, k = 8, 12, 2, 4
    x = correlated_inputs(300, cols, seed=21)
    h = x.T @ x
    w = torch.randn(rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(22))
    luts = sorted_luts(groups, k, seed=23)
    outliers = torch.tensor([5, 30, 77])
    q, _ = gptq_quantize(w, h, luts, outliers=outliers)
    new = refit_luts(w, h, q, luts, outliers=outliers)
    # Brute force: the output W X^T is linear in the 8 LUT entries; solve the least squares.
    row_luts = luts.repeat_interleave(rows // groups, 0)
    idx = (q[..., None] - row_luts[:, None, :]).abs().argmin(-1)
    exact = torch.zeros(rows * cols, dtype=torch.bool)
    exact[outliers] = True
    exact = exact.view(rows, cols)
    fixed = torch.where(exact, q, torch.zeros_like(q))
    columns = []
    for g in range(groups):
        for j in range(k):
            m = ((idx == j) & ~exact).double()
            m[[r for r in range(rows) if r // (rows // groups) != g]] = 0
            columns.append((m @ x.T).reshape(-1))
    design = torch.stack(columns, 1)
    target = ((w - fixed) @ x.T).reshape(-1)
    ref = torch.linalg.lstsq(design, target[:, None]).solution[:, 0].view(groups, k)
    # Normal equations (K x K) vs least squares on the 8-column design matrix: the same solution;
    # squaring the conditioning in the normal equations costs digits, hence 1e-8, not 1e-12.
    torch.testing.assert_close(new, ref, rtol=1e-8, atol=1e-10)
    from edkm.gptq import _with_luts

    assert output_error(w, _with_luts(q, luts, new, exact), h) <= output_error(w, q, h)


def test_gptq_with_refit_lowers_the_error_further():
    def run(rounds):
        m = TinyLM()
        ids = torch.randint(0, 40, (8, 4, 12), generator=torch.Generator().manual_seed(1))
        hs = input_hessians(m, ids, progress=False)
        edkm.palettize_(m, edkm.Config(bits=2, group_size=4, outlier_fraction=0.02, outlier_criterion="magnitude"))
        m.eval()
        stats = gptq_(m, hs, refit_rounds=rounds)
        for mod in (m.up, m.down):  # still exactly on the (new) LUTs, which are sorted
            torch.testing.assert_close(mod._hard_weight().double(), mod.weight.detach().double(), rtol=0, atol=0)
            c = mod.centroids
            assert torch.equal(c, c.sort(dim=1).values)
        return stats

    plain, refit = run(0), run(2)
    for name in plain:
        assert refit[name].gptq_error <= plain[name].gptq_error * (1 + 1e-9)
    assert sum(s.gptq_error for s in refit.values()) < sum(s.gptq_error for s in plain.values())
    with pytest.raises(ValueError, match="refit_rounds must be"):
        gptq_(TinyLM(), {}, refit_rounds=-1)
