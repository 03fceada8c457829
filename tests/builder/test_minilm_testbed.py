"""all-MiniLM-L6-v2 as test material (testbeds/minilm.py): the ONNX written from the shipped safetensors, the
pure-Python tokenizer and the build project. Expected numbers come from transformers/sentence-transformers,
measured once outside the repository (see the module's docstring); these tests need neither."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from builder.data import load_build_data
from edgepack.config import load_build_config
from testbeds import minilm

FIXED = "The café in Zürich serves the best crème brûlée I've ever tasted!"
# transformers 5.25.0 BertTokenizerFast.from_pretrained(minilm_dir())(FIXED)["input_ids"]:
# [CLS] the cafe in zurich serves the best cr ##eme br ##ule ##e i ' ve ever tasted ! [SEP]
FIXED_IDS = [101, 1996, 7668, 1999, 10204, 4240, 1996, 2190, 13675, 21382, 7987, 9307, 2063, 1045, 1005, 2310, 2412,
             12595, 999, 102]
# sentence-transformers 6.3.0 SentenceTransformer(minilm_dir()).encode([FIXED])[0][:8]
FIXED_EMBEDDING_HEAD = [0.04894126, -0.0309708, 0.02582915, -0.02129747, -0.02007159, 0.01760784, 0.00406311, 0.00942302]
PARAPHRASE = ("It is sunny and warm in London today.", "Today the weather in London is bright and hot.")
UNRELATED = "The compiler crashed while building the project."


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _embed(session: ort.InferenceSession, texts: list[str], max_len: int = 64) -> np.ndarray:
    input_ids, attention_mask = minilm.tokenize(texts, max_len=max_len)
    (embedding,) = session.run(["embedding"], {"input_ids": input_ids, "attention_mask": attention_mask})
    return embedding


@pytest.fixture(scope="module")
def full_model(tmp_path_factory) -> Path:
    return minilm.export_onnx(tmp_path_factory.mktemp("minilm") / "model.onnx")


@pytest.fixture(scope="module")
def one_layer_project(tmp_path_factory) -> Path:
    return minilm.make_project(tmp_path_factory.mktemp("minilm-1l"), n_calib=8, n_val=16, layers=1)


# --- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_gives_hugging_face_ids_for_a_fixed_sentence():
    input_ids, attention_mask = minilm.tokenize([FIXED], max_len=24)
    assert input_ids.dtype == np.int64 and attention_mask.dtype == np.int64
    assert input_ids[0].tolist() == FIXED_IDS + [0] * 4
    assert attention_mask[0].tolist() == [1] * 20 + [0] * 4
    truncated, mask = minilm.tokenize([FIXED], max_len=8)
    assert truncated[0].tolist() == FIXED_IDS[:7] + [102] and mask.all()


def test_tokenizer_rules_for_unknown_long_and_cjk_words():
    vocab = minilm.load_vocab()
    assert minilm.basic_tokenize("Hello,WORLD!  naïve\t中文") == ["hello", ",", "world", "!", "naive", "中", "文"]
    assert minilm.wordpiece("a" * 101, vocab) == ["[UNK]"]
    pieces = minilm.wordpiece("unaffable", vocab)
    assert len(pieces) > 1 and pieces[0] == "una" and all(p.startswith("##") for p in pieces[1:])
    input_ids, mask = minilm.tokenize(["", "🙂"], max_len=4)
    assert input_ids.tolist() == [[101, 102, 0, 0], [101, 100, 102, 0]] and mask.sum(axis=1).tolist() == [2, 3]


def test_sentences_come_from_the_seed_alone():
    texts = minilm.sentences(200, seed=0)
    assert texts == minilm.sentences(200, seed=0) and texts != minilm.sentences(200, seed=1)
    assert len(set(texts)) > 150
    lengths = minilm.tokenize(texts, max_len=64)[1].sum(axis=1)
    assert lengths.min() < 20 and (lengths == 64).any()  # short ones padded, long ones truncated


# --- the ONNX graph ---------------------------------------------------------------------------


def test_graph_is_a_plain_transformer_with_dynamic_batch_and_sequence(full_model):
    model = onnx.load(str(full_model), load_external_data=False)
    graph = model.graph
    assert [(i.name, [d.dim_param for d in i.type.tensor_type.shape.dim]) for i in graph.input] == [
        ("input_ids", ["batch", "seq"]), ("attention_mask", ["batch", "seq"])]
    (out,) = graph.output
    assert out.name == "embedding" and [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 384]
    ops = [n.op_type for n in graph.node]
    assert ops.count("Softmax") == 6 and ops.count("Erf") == 6 and ops.count("LayerNormalization") == 13
    assert ops.count("MatMul") == 6 * 8 and "Gather" in ops
    names = {n.name: n.op_type for n in graph.node}
    assert names["layer.0.attention.query"] == "MatMul" and names["layer.5.output.LayerNorm"] == "LayerNormalization"
    weights = {i.name: list(i.dims) for i in graph.initializer}
    assert weights["layer.0.intermediate.dense.weight"] == [384, 1536]  # [in, out]


def test_full_model_embeds_sentences_like_sentence_transformers(full_model):
    session = _session(full_model)
    texts = [FIXED, *PARAPHRASE, UNRELATED, *minilm.sentences(4, seed=3)]
    embedding = _embed(session, texts)
    assert embedding.shape == (8, 384) and embedding.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embedding[0, :8], FIXED_EMBEDDING_HEAD, atol=2e-6)
    paraphrase, unrelated = float(embedding[1] @ embedding[2]), float(embedding[1] @ embedding[3])
    assert paraphrase > 0.7 and unrelated < 0.3, (paraphrase, unrelated)
    # Padding is masked out: one sentence alone, with no padding, embeds as it does in the padded batch.
    alone = _embed(session, [texts[5]], max_len=int(minilm.tokenize([texts[5]])[1].sum()))
    np.testing.assert_allclose(alone[0], embedding[5], atol=1e-5)


def test_layers_truncates_the_encoder(one_layer_project):
    model = onnx.load(str(one_layer_project.parent / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Softmax") == 1 and ops.count("LayerNormalization") == 3
    with pytest.raises(ValueError, match="layers"):
        minilm.export_onnx(one_layer_project.parent / "bad.onnx", layers=7)


# --- the build project ------------------------------------------------------------------------


def test_project_loads_with_the_builder_and_its_data_fits_the_model(one_layer_project):
    config = load_build_config(one_layer_project)
    assert config.metric == "cosine" and config.gates.max_accuracy_drop == 0.02
    assert config.inputs == {"input_ids": (1, 64), "attention_mask": (1, 64)}
    assert config.model_path == one_layer_project.parent / "model.onnx" and config.model_path.is_file()
    data = load_build_data(config.calibration_path, config.validation_path)
    assert data.calibration.count == 8 and data.validation.count == 16 and data.validation.labels is None
    for split in (data.calibration, data.validation):
        assert sorted(split.arrays) == ["attention_mask", "input_ids"]
        assert all(a.dtype == np.int64 and a.shape[1:] == (64,) for a in split.arrays.values())
        assert (split.arrays["input_ids"][:, 0] == 101).all()
        assert ((split.arrays["input_ids"] == 0) == (split.arrays["attention_mask"] == 0)).all()
    session = _session(config.model_path)
    data.check_against(dict(config.inputs), {i.name: np.int64 for i in session.get_inputs()})
    feeds = list(data.feeds("validation"))
    outputs = np.concatenate([session.run(["embedding"], feed)[0] for feed in feeds])
    assert outputs.shape == (16, 384)
    np.testing.assert_allclose(np.linalg.norm(outputs, axis=1), 1.0, atol=1e-5)


def test_cli_writes_a_project(tmp_path, capsys):
    assert minilm.main([str(tmp_path / "p"), "--layers", "1", "--n-calib", "2", "--n-val", "3", "--seq-len", "16"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == tmp_path / "p" / "edgepack.yaml"
    config = load_build_config(path)
    assert config.inputs == {"input_ids": (1, 16), "attention_mask": (1, 16)}
    with np.load(tmp_path / "p" / "val.npz") as npz:
        assert npz["input_ids"].shape == (3, 16)
