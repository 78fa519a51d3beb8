"""The k-NN baseline against a brute-force NumPy reference, its chunking, and `scaling knn`."""

import json
import shutil

import numpy as np
import pytest
from conftest import scaling_cli

from scaling import ScalingError, knn, report
from scaling.cli import main
from scaling.results import load

KS = (1, 2, 3, 7)


def reference_distances(train, queries, distance):
    a, b = np.asarray(queries, np.float64), np.asarray(train, np.float64)
    if distance == "l1":
        return np.abs(a[:, None] - b[None]).sum(-1)
    if distance == "l2":
        return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    unit = lambda x: x / np.where((n := np.linalg.norm(x, axis=1, keepdims=True)) > 0, n, 1)  # noqa: E731
    return 1 - unit(a) @ unit(b).T


def reference_neighbours(train, queries, k, distance, exclude=None):
    d = reference_distances(train, queries, distance)
    if exclude is not None:
        d[np.arange(len(queries)), exclude] = np.inf
    index = np.broadcast_to(np.arange(len(train)), d.shape)
    order = np.stack([np.lexsort((i, row)) for row, i in zip(d, index, strict=True)])[:, :k]
    return np.take_along_axis(d, order, 1), order


def reference_vote(labels, distances, how):
    """One query: the documented rule, written plainly."""
    if how == "distance" and any(d == 0 for d in distances):
        weights = [1.0 if d == 0 else 0.0 for d in distances]
    elif how == "distance":
        weights = [1 / d for d in distances]
    else:
        weights = [1.0] * len(labels)
    score, first = {}, {}
    for rank, (label, weight) in enumerate(zip(labels, weights, strict=True)):
        if weight > 0:
            score[label] = score.get(label, 0.0) + weight
            first.setdefault(label, rank)
    best = max(score.values())
    return min((first[c], c) for c in score if score[c] == best)[1]


def reference_predict(train, labels, queries, k, distance, how):
    d, i = reference_neighbours(train, queries, k, distance)
    return np.array([reference_vote(labels[r], dr, how) for dr, r in zip(d, i, strict=True)])


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    train = rng.random((40, 6)).astype(np.float32)
    return train, rng.integers(0, 3, 40), rng.random((19, 6)).astype(np.float32)


@pytest.mark.parametrize("distance", knn.DISTANCES)
def test_matches_brute_force(problem, distance):
    train, labels, queries = problem
    for k in KS:
        d, i = knn.neighbours(train, queries, k, distance, query_chunk=8)
        ref_d, ref_i = reference_neighbours(train, queries, k, distance)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_allclose(d, ref_d, rtol=1e-5, atol=1e-5)
        for how in knn.VOTES:
            pairs = zip(ref_d, ref_i, strict=True)
            expected = [reference_vote(labels[r], dr, how) for dr, r in pairs]
            np.testing.assert_array_equal(knn.vote(labels[i], d, 3, how), expected)
    # Leave-one-out: each training example queried against the others.
    own = np.arange(len(train))
    d, i = knn.neighbours(train, train, 3, distance, exclude=own, query_chunk=16)
    np.testing.assert_array_equal(i, reference_neighbours(train, train, 3, distance, own)[1])


@pytest.mark.parametrize("distance", knn.DISTANCES)
def test_chunked_equals_unchunked(problem, distance):
    """Tiny chunks give the same neighbours. On small integers (every distance exact in float32,
    and many equal) l1 and l2 give bit-equal distances too; on other data the matmul of l2 and
    cosine may round differently for other chunk shapes (XLA's accumulation order), by an ulp."""
    train, _, queries = problem
    grid = np.random.default_rng(1).integers(0, 3, (60, 4)).astype(np.float32)
    # Cosine's equal angles (1, 2) and (2, 4) round apart: no grid for it.
    cases = [(train, queries)] + [(grid[:45], grid[45:])] * (distance != "cosine")
    for data, query in cases:
        exact = data is not train  # the grid
        whole = knn.neighbours(data, query, 7, distance, query_chunk=256)
        for query_chunk, train_chunk in [(1, 1), (8, 3), (16, 7), (3, len(data) - 1)]:
            part = knn.neighbours(data, query, 7, distance, query_chunk=query_chunk,
                                  train_chunk=train_chunk)  # fmt: skip
            np.testing.assert_array_equal(part[1], whole[1])
            if exact:
                np.testing.assert_array_equal(part[0], whole[0])
            else:
                np.testing.assert_allclose(part[0], whole[0], rtol=1e-5, atol=1e-6)
        if exact:  # the grid's ties resolve as the reference's: by training index
            np.testing.assert_array_equal(
                whole[1], reference_neighbours(data, query, 7, distance)[1]
            )


def test_crafted_ties():
    # Integer points on a line (exact distances): the query at 0, training points at -1, +1
    # (classes 1, 0), +2 and -2 (class 2), and a duplicate of +1 of class 2.
    train = np.array([[-1], [1], [2], [-2], [1]], np.float32) * np.array([[1, 0]], np.float32)
    labels = np.array([1, 0, 2, 2, 2])
    query = np.zeros((1, 2), np.float32)
    for distance in ("l1", "l2"):
        d, i = knn.neighbours(train, query, 5, distance)
        np.testing.assert_array_equal(i[0], [0, 1, 4, 2, 3])  # equal distances: smaller index
        for k in KS[:3] + (5,):
            for how in knn.VOTES:
                expected = reference_predict(train, labels, query, k, distance, how)
                got = knn.predict(train, labels, query, k, distance, how)
                np.testing.assert_array_equal(got, expected, err_msg=f"{distance} k={k} {how}")
        # k=2: classes 1 and 0 tie at one vote each; class 1's member (index 0) ranks first.
        assert knn.predict(train, labels, query, 2, distance)[0] == 1
        # k=5: class 2 has three votes; by distance weight 1 + 1 + 1/2 = 2.5 against 1 and 1.
        assert knn.predict(train, labels, query, 5, distance, "distance")[0] == 2
    # A zero distance wins outright under the distance vote, however many others outvote it.
    train = np.array([[0, 0], [1, 0], [0, 1], [-1, 0], [5, 5]], np.float32)
    labels = np.array([3, 1, 1, 1, 0])
    assert knn.predict(train, labels, np.zeros((1, 2), np.float32), 4, "l2", "distance")[0] == 3
    assert knn.predict(train, labels, np.zeros((1, 2), np.float32), 4, "l2", "majority")[0] == 1
    # Cosine: same-direction vectors are at distance 0 from each other.
    d, i = knn.neighbours(np.array([[2, 0], [0, 3], [1, 0]], np.float32),
                          np.array([[4, 0]], np.float32), 3, "cosine")  # fmt: skip
    np.testing.assert_array_equal(i[0], [0, 2, 1])


def test_bad_settings(problem):
    train, _, queries = problem
    for k, distance, vote in [(0, "l2", "majority"), (1, "l3", "majority"), (1, "l2", "mode")]:
        with pytest.raises(ScalingError):
            knn.check_settings(k, distance, vote)
    with pytest.raises(ScalingError, match="exceeds"):
        knn.neighbours(train, queries, 41, "l2")


def test_command_on_digits(tmp_path, monkeypatch):
    out = scaling_cli("knn", "--data", "digits", "--image-size", "8", "--k", "1", "5",
                      "--distance", "l2", "--workdir", str(tmp_path / "knn"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "knn" / "k=5" / "summary.json").read_text())
    assert (summary["model"], summary["k"], summary["distance"]) == ("knn_l2_k5", 5, "l2")
    df = load(tmp_path / "knn").set_index("model")
    assert set(df.index) == {"knn_l2_k1", "knn_l2_k5"}
    assert (df.status == "done").all()
    assert (df.test_accuracy > 0.9).all(), df.test_accuracy
    assert (df.train_accuracy > 0.9).all(), df.train_accuracy
    # Beside a trained run in one report: the baselines (no parameters, no FLOPs) are lines
    # across the Pareto plots, which a log axis could not show as points.
    trained = tmp_path / "knn" / "trained"
    shutil.copytree(tmp_path / "knn" / "k=1", trained)
    record = json.loads((trained / "summary.json").read_text())
    record.update(model="resnet8", params=78042, flops=2.5e6, macs=1.2e6, test_accuracy=0.8)
    (trained / "summary.json").write_text(json.dumps(record))
    (trained / "config.json").write_text(json.dumps(dict(model=dict(name="resnet8"), seed=0)))
    text = report.write([tmp_path / "knn"], tmp_path / "report").read_text()
    assert "3 trials: 3 done." in text and (tmp_path / "report" / "pareto.png").exists()
    figures = []
    monkeypatch.setattr(report, "save", lambda fig, out, name: figures.append(fig))
    report.pareto(load(tmp_path / "knn"), tmp_path, [])
    params_axis = figures[0].axes[0]
    levels = [line.get_ydata()[0] for line in params_axis.get_lines() if line.get_ls() == ":"]
    assert sorted(levels) == pytest.approx(sorted(df.test_accuracy))


def test_command_bad_input(tmp_path, capsys):
    """One line on stderr, exit status 2, nothing written: the command itself once, then (fast)
    the same entry point in this process."""
    workdir = tmp_path / "knn"
    digits = ["knn", "--data", "digits", "--image-size", "8", "--workdir", str(workdir)]
    out = scaling_cli(*digits, "--k", "0")
    assert out.returncode == 2, out.stderr
    assert out.stderr == "scaling knn: error: k must be integers >= 1, got [0]\n"
    for args in [["--distance", "l3"], ["--vote", "mode"], ["--train-examples", "5", "--k", "9"],
                 ["--image-size", "0"], ["--train-chunk", "0"]]:  # fmt: skip
        with pytest.raises(SystemExit) as exit:
            main([*digits, *args])
        assert exit.value.code == 2, args
        error = capsys.readouterr().err
        assert len(error.strip().splitlines()) == 1 and error.startswith("scaling knn: error:")
        assert not workdir.exists()
    (tmp_path / "other.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main([*digits[:-1], str(tmp_path)])
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["other.txt"]


def test_features_of_a_trained_run_are_its_classifiers_input(tmp_path, tiny_config, capsys):
    from scaling import probe
    from scaling.train import train

    summary = train(tiny_config(), tmp_path / "run")
    ds, train_features, test_features, _ = probe.run_features(tmp_path / "run")
    assert train_features.shape == (len(ds.train_labels), 64)  # ResNet-8's pooled 64 channels
    _, _, model, _ = probe.restore(tmp_path / "run")
    logits = np.asarray(model.head(test_features))
    accuracy = np.mean(logits.argmax(-1) == ds.test_labels)
    assert accuracy == pytest.approx(summary["test_accuracy"], abs=1 / len(ds.test_labels))
    main(["knn", "--features", str(tmp_path / "run"), "--k", "3", "--workdir",
          str(tmp_path / "knn")])  # fmt: skip
    probe_summary = json.loads((tmp_path / "knn" / "summary.json").read_text())
    assert probe_summary["model"] == "knn_l2_k3_resnet8"
    assert probe_summary["train_examples"] == summary["train_examples"]
    expected = knn.predict(train_features, ds.train_labels, test_features, k=3)
    assert probe_summary["test_accuracy"] == pytest.approx(np.mean(expected == ds.test_labels))
    with pytest.raises(SystemExit) as exit:
        main(["knn", "--features", str(tmp_path / "run"), "--data", "digits"])
    assert exit.value.code == 2 and "drop --data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        main(["knn", "--features", str(tmp_path / "none")])
    assert exit.value.code == 2 and "no training run there" in capsys.readouterr().err
