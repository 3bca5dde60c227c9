"""blues-experts plot: a short real blues-train run, its monitor CSV files (the expert telemetry of
blues.train.metrics among them), and the PNGs drawn from them; bad RUN_DIRs are one line, exit 2."""
import os
import subprocess
import sys

import pytest
import torch

from blues.cli.experts import DPI, figure_size, main, monotone_clock, read_series

L, E, STEPS, LOG = 2, 4, 20, 5


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """blues-train at the smallest size that still routes: 2 MoE layers of 4 experts, 20 steps, a log line
    every 5 and a validation every 10 (~15 s on a quiet 2-core machine)."""
    from blues.data.prepare import prepare
    tmp = tmp_path_factory.mktemp("experts_run")
    prepare(str(tmp / "data"), progress=False)
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "blues-train"), f"n_layer={L}", "n_embd=64",
                        "n_head=2", "block_size=32", "micro_batch_size=4", f"num_experts={E}", "expert_ffn_size=64",
                        f"max_steps={STEPS}", f"log_interval={LOG}", "eval_interval=10", "eval_steps=2",
                        "save_interval=100", "warmup_steps=5", f"data_dir={tmp / 'data'}", f"out_dir={tmp / 'out'}",
                        "--no_export", "--progress", "off"], cwd=tmp, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return tmp / "out", p.stdout


@pytest.mark.slow  # shares one ~20-60 s blues-train run
def test_run_logs_the_expert_telemetry(small_run):
    out, stdout = small_run
    mon = out / "monitor" / "blues"
    for i in range(L):
        div = read_series(str(mon / f"moe_layer_{i}_expert_diversity.csv"))
        assert list(div) == [5, 10, 15, 20], "one row per log line"
        assert all(1 / E <= v <= 1 for v in div.values()), div
        assert list(read_series(str(mon / f"moe_layer_{i}_dead_expert_frac.csv"))) == [5, 10, 15, 20]
        for s in (5, 20):  # load / ideal averages to 1 over a layer's experts, by definition of the ideal
            util = [read_series(str(mon / f"moe_expert_utilization_layer_{i}_expert_{j}.csv"))[s] for j in range(E)]
            assert sum(util) == pytest.approx(E, rel=1e-9), util
    assert len(read_series(str(mon / "Train_elapsed_s.csv"))) == STEPS
    line = next(x for x in stdout.splitlines() if x.startswith(f"step {STEPS}/{STEPS} |"))
    assert "| experts worst layer " in line and " diversity " in line, line


@pytest.mark.slow  # shares one ~20-60 s blues-train run
def test_plot_writes_valid_pngs_of_the_expected_size(small_run, tmp_path, capsys):
    from PIL import Image
    out, _ = small_run
    assert main(["plot", str(out), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(os.path.basename(p) for p in printed) == ["expert_load.png", "final_load.png", "loss.png"]
    for name, layers in (("expert_load", L), ("final_load", L), ("loss", 0)):
        w, h = figure_size(name, layers)
        with Image.open(tmp_path / f"{name}.png") as im:
            im.verify()  # a complete, uncorrupted PNG
        with Image.open(tmp_path / f"{name}.png") as im:
            assert im.format == "PNG" and im.size == (round(w * DPI), round(h * DPI)), (name, im.size)
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 20, f"{name}.png looks blank"
    assert figure_size("expert_load", 3)[1] > figure_size("expert_load", 2)[1], "one row per MoE layer"


@pytest.mark.slow  # shares one ~20-60 s blues-train run
def test_default_output_folder_is_run_dir_plots(small_run, capsys):
    out, _ = small_run
    assert main(["plot", str(out)]) == 0
    assert (out / "plots" / "expert_load.png").is_file()


@pytest.mark.parametrize("case", ["missing", "no_csv"])
def test_bad_run_dir_is_one_line_exit_2(tmp_path, capsys, case):
    run_dir = tmp_path / "nope" if case == "missing" else tmp_path
    (tmp_path / "monitor" / "blues").mkdir(parents=True)  # an empty monitor folder is no run either
    assert main(["plot", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("blues-experts: error: RUN_DIR") and "Traceback" not in err
    assert ("does not exist" if case == "missing" else "holds no monitor CSV files") in err
    assert not (tmp_path / "plots").exists(), "nothing written for a bad RUN_DIR"


def test_csv_of_a_resumed_run(tmp_path):
    """DeepSpeed's csv_monitor writes a header each time a process opens the file, so a run resumed from
    its step-3 checkpoint adds a header mid-file and writes steps 4-5 again: the later rows win; its
    Train/elapsed_s restarts at 0 and the clock continues from the last time written."""
    p = tmp_path / "Train_elapsed_s.csv"
    p.write_text("step,elapsed_s\n1,1.0\n2,2.0\n3,3.0\n4,4.0\n5,5.0\nstep,elapsed_s\n4,0.5\n5,1.5\n6,2.5\n")
    s = read_series(str(p))
    assert s == {1: 1.0, 2: 2.0, 3: 3.0, 4: 0.5, 5: 1.5, 6: 2.5}
    assert monotone_clock(s) == {1: 1.0, 2: 2.0, 3: 3.0, 4: 3.5, 5: 4.5, 6: 5.5}
    p.write_text("step,loss\n1,abc\n")
    with pytest.raises(ValueError, match=r"row \['1', 'abc'\] is not `step,value`"):
        read_series(str(p))


# ----------------------------------------------------------------------------- report: routing on held-out data

REPORT_SMALL = dict(n_layer=3, num_dense_layers=1, n_embd=64, n_head=2, block_size=32, num_experts=E,
                    expert_ffn_size=64, balance_bias_rate=0.0)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A real tiny model (random weights, MoE in blocks 1 and 2 after one dense block) saved by save_pretrained
    with the tokenizer of a prepared data folder (the built-in corpus)."""
    from blues.data.prepare import prepare
    from blues.data.tokenizer import Tokenizer
    from blues.model import Blues
    from blues.presets import tiny
    tmp = tmp_path_factory.mktemp("report")
    prepare(str(tmp / "data"), progress=False)
    torch.manual_seed(0)
    tok = Tokenizer.load(str(tmp / "data"))
    Blues(tiny().replace(**REPORT_SMALL)).save_pretrained(str(tmp / "model"), tokenizer=tok)
    return tmp / "model", tmp / "data"


def test_report_writes_a_heatmap_per_layer_and_a_table_of_every_expert(small_model, tmp_path, capsys):
    from PIL import Image
    model_dir, data = small_model
    assert main(["report", str(model_dir), "--data", str(data), "--batches", "2", "--batch_size", "4",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(os.path.basename(p) for p in printed) == ["token_experts_block_1.png", "token_experts_block_2.png",
                                                             "top_tokens.md"]
    w, h = figure_size("token_experts", 1)
    for b in (1, 2):
        with Image.open(tmp_path / f"token_experts_block_{b}.png") as im:
            im.verify()  # a complete, uncorrupted PNG
        with Image.open(tmp_path / f"token_experts_block_{b}.png") as im:
            assert im.format == "PNG" and im.size == (round(w * DPI), round(h * DPI)), im.size
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 20, "looks blank"
    table = (tmp_path / "top_tokens.md").read_text()
    for b in (1, 2):
        section = table.split(f"## block {b}\n")[1].split("## block")[0]
        rows = [r for r in section.splitlines() if r.startswith("| ") and r[2].isdigit()]
        assert [int(r.split("|")[1]) for r in rows] == list(range(E)), section  # every expert, in order
        shares = [float(r.split("|")[2].strip().rstrip("%")) for r in rows]
        assert sum(shares) == pytest.approx(100, abs=0.05 * E)  # each rounded to 0.1%
    assert "## block 0" not in table  # the dense block has no experts


def test_report_counts_are_the_routing_the_model_ran(small_model):
    """token_expert_counts (L, V, E) against the model's own per-layer counts (BluesOutput.expert_selected)
    over the same batches: equal per expert, and every token occurrence makes top_k assignments."""
    from blues.cli.experts import token_expert_counts
    from blues.data.loader import TokenLoader
    from blues.model import Blues
    model_dir, data = small_model
    model = Blues.from_pretrained(str(model_dir)).eval()
    xs = [x for x, _ in TokenLoader(str(data), "val", 32, 4).eval_batches(2)]
    c = token_expert_counts(model, xs)
    with torch.no_grad():
        selected = sum(model(x).expert_selected for x in xs)  # (L, E)
    assert c.shape == (2, model.config.model.vocab_size, E)
    assert torch.equal(c.sum(dim=1), selected.to(c.dtype))
    K = model.config.moe.top_k
    occurrences = torch.bincount(torch.cat(xs).reshape(-1), minlength=c.shape[1])  # (V,)
    assert torch.equal(c.sum(dim=2), K * occurrences.expand(2, -1))


@pytest.mark.parametrize("case", ["model_missing", "data_missing", "batches", "dense"])
def test_report_bad_inputs_are_one_line_exit_2(small_model, tmp_path, capsys, case):
    from blues.model import Blues
    from blues.presets import tiny
    model_dir, data = small_model
    args = {"model_dir": str(model_dir), "--data": str(data), "--batches": "2"}
    expect = {"model_missing": "MODEL_DIR", "data_missing": "does not exist: run blues-prepare",
              "batches": "--batches 0 is invalid", "dense": "the model has no MoE layer"}[case]
    if case == "model_missing":
        args["model_dir"] = str(tmp_path / "nope")
    elif case == "data_missing":
        args["--data"] = str(tmp_path / "nodata")
    elif case == "batches":
        args["--batches"] = "0"
    else:
        Blues(tiny().replace(**dict(REPORT_SMALL, num_dense_layers=3))).save_pretrained(str(tmp_path / "dense"))
        args["model_dir"] = str(tmp_path / "dense")
    out = tmp_path / "out"
    rc = main(["report", args.pop("model_dir"), *[x for kv in args.items() for x in kv], "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("blues-experts: error: ") and expect in err, err
    assert not out.exists(), "nothing written for bad inputs"
