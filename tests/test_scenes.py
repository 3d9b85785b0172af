"""Tests of the procedural scene generator, prompt splits and scene parser."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools

import numpy as np
import pytest

from diffusion_env.shapes.scenes import (
    ATTRIBUTE_KEYS,
    COLOR_NAMES,
    COUNTS,
    PALETTE,
    SHAPES,
    SIZES,
    VOCABULARY,
    ParsedScene,
    Scene,
    all_prompts,
    attribute_agreement,
    attribute_matches,
    caption,
    describe,
    heldout_prompts,
    heldout_triples,
    parse_scene,
    parse_scenes,
    render_scene,
    sample_scene,
    sample_training_batch,
    train_prompts,
)

N_PARSE = 1000


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, list[str], list[Scene]]:
    """1,000 ground-truth scenes from a seeded generator, shared by tests."""
    return sample_training_batch(np.random.default_rng(1234), N_PARSE)


def _triple(meta: dict) -> tuple[str, str, str]:
    return (meta["color"], meta["shape"], meta["background"])


# --------------------------------------------------------------------------
# Vocabulary and rendering
# --------------------------------------------------------------------------


def test_palette_colours_are_far_apart() -> None:
    values = np.array(list(PALETTE.values()), dtype=float)
    dists = [np.linalg.norm(a - b) for a, b in itertools.combinations(values, 2)]
    assert len(PALETTE) == 8
    assert min(dists) >= 120.0


def test_render_shape_dtype_and_colours() -> None:
    scene = sample_scene(np.random.default_rng(0))
    for size in (32, 64):
        image = render_scene(scene, size)
        assert image.shape == (size, size, 3)
        assert image.dtype == np.uint8
        colours = {tuple(int(v) for v in px) for px in image.reshape(-1, 3)}
        assert colours == {PALETTE[scene.background], PALETTE[scene.color]}
    assert render_scene(scene).shape == (32, 32, 3)


def test_shape_sizes_in_pixels(batch: tuple[np.ndarray, list[str], list[Scene]]) -> None:
    _, _, scenes = batch
    for scene in scenes[:300]:
        for center in scene.centers:
            single = dataclasses.replace(scene, count=1, centers=(center,))
            mask = np.any(render_scene(single) != PALETTE[scene.background], axis=-1)
            ys, xs = np.nonzero(mask)
            side = max(np.ptp(ys) + 1, np.ptp(xs) + 1)
            lo, hi = (6, 8) if scene.size == "small" else (12, 13)
            # A circle's or triangle's extreme point may miss every pixel
            # centre, so its raster can be one pixel short of the nominal side.
            assert lo - 1 <= side <= hi, (scene, side)


def test_captions_use_only_vocabulary(batch: tuple[np.ndarray, list[str], list[Scene]]) -> None:
    _, captions, scenes = batch
    vocab = set(VOCABULARY)
    for text in captions + [p for p, _ in all_prompts()]:
        assert set(text.split()) <= vocab, text
    assert captions == [caption(s) for s in scenes]
    assert (
        describe("blue", "red", "circle", 1, "small") == "a small red circle on a blue background"
    )
    assert (
        describe("black", "yellow", "square", 2, "large")
        == "two large yellow squares on a black background"
    )
    assert describe("orange", "green", "triangle", 3, "small") == (
        "three small green triangles on an orange background"
    )


def test_sampling_is_deterministic() -> None:
    a_img, a_cap, a_sc = sample_training_batch(np.random.default_rng(7), 64)
    b_img, b_cap, b_sc = sample_training_batch(np.random.default_rng(7), 64)
    c_img, _, _ = sample_training_batch(np.random.default_rng(8), 64)
    assert np.array_equal(a_img, b_img)
    assert a_cap == b_cap
    assert a_sc == b_sc
    assert not np.array_equal(a_img, c_img)


def test_batch_matches_scenes(batch: tuple[np.ndarray, list[str], list[Scene]]) -> None:
    images, _, scenes = batch
    assert images.shape == (N_PARSE, 32, 32, 3) and images.dtype == np.uint8
    for image, scene in zip(images[:50], scenes[:50]):
        assert np.array_equal(image, render_scene(scene))
    # Pre-training data covers every attribute value.
    vocab = {"background": COLOR_NAMES, "color": COLOR_NAMES, "shape": SHAPES,
             "count": COUNTS, "size": SIZES}
    for key, values in vocab.items():
        assert {s.metadata[key] for s in scenes} == set(values)


def test_shape_colour_differs_from_background(
    batch: tuple[np.ndarray, list[str], list[Scene]],
) -> None:
    _, _, scenes = batch
    assert all(s.color != s.background for s in scenes)
    rng = np.random.default_rng(3)
    assert all(sample_scene(rng, color="red").background != "red" for _ in range(100))
    assert all(sample_scene(rng, background="red").color != "red" for _ in range(100))


def test_multiple_shapes_do_not_overlap_or_touch() -> None:
    rng = np.random.default_rng(5)
    # Three large shapes is the most crowded case.
    scenes = [sample_scene(rng, count=3, size="large") for _ in range(100)]
    scenes += [sample_scene(rng, count=c) for c in (2, 3) for _ in range(100)]
    for scene in scenes:
        masks = []
        for center in scene.centers:
            single = dataclasses.replace(scene, count=1, centers=(center,))
            masks.append(np.any(render_scene(single) != PALETTE[scene.background], axis=-1))
        for a, b in itertools.combinations(masks, 2):
            # Grow one mask by a pixel in all 8 directions: the shapes must
            # not even touch diagonally.
            padded = np.pad(a, 1)
            grown = np.zeros_like(a)
            for dy in range(3):
                for dx in range(3):
                    grown |= padded[dy : dy + 32, dx : dx + 32]
            assert not (grown & b).any(), scene
        union = np.any(masks, axis=0)
        # The outermost ring stays background (the parser reads it).
        assert not (union[0].any() or union[-1].any() or union[:, 0].any() or union[:, -1].any())


def test_fixed_attributes_are_respected() -> None:
    rng = np.random.default_rng(11)
    for _, meta in all_prompts()[::37]:
        assert sample_scene(rng, **meta).metadata == meta


def test_scene_validation() -> None:
    scene = sample_scene(np.random.default_rng(0), count=1)
    with pytest.raises(ValueError, match="must differ"):
        dataclasses.replace(scene, color=scene.background)
    with pytest.raises(ValueError, match="unknown shape 'hexagon'; allowed"):
        dataclasses.replace(scene, shape="hexagon")
    with pytest.raises(ValueError, match="centres"):
        dataclasses.replace(scene, count=2)
    with pytest.raises(ValueError, match="unknown count 4; allowed"):
        sample_scene(np.random.default_rng(0), count=4)
    with pytest.raises(ValueError, match="Generator"):
        sample_scene(0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size must be an integer >= 16"):
        render_scene(scene, 8)
    with pytest.raises(ValueError, match="batch_size"):
        sample_training_batch(np.random.default_rng(0), 0)


# --------------------------------------------------------------------------
# Prompts and splits
# --------------------------------------------------------------------------


def test_splits_disjoint_and_cover_all_combinations() -> None:
    everything = all_prompts()
    train, held = train_prompts(), heldout_prompts()
    assert len(everything) == 8 * 7 * 3 * len(COUNTS) * 2
    assert len({p for p, _ in everything}) == len(everything)
    train_triples = {_triple(m) for _, m in train}
    held_triples = {_triple(m) for _, m in held}
    assert train_triples.isdisjoint(held_triples)
    assert held_triples == set(heldout_triples())
    assert sorted(p for p, _ in train + held) == sorted(p for p, _ in everything)
    assert len(held_triples) == 34  # round(0.2 * 168)
    for text, meta in everything:
        assert set(meta) == set(ATTRIBUTE_KEYS)
        assert describe(**meta) == text
    # Held-out prompts combine attribute values that RL training does see.
    for key in ("background", "color", "shape"):
        assert {m[key] for _, m in train} == {m[key] for _, m in everything}


@pytest.mark.parametrize(("subset", "counts"), [("several", (2, 3)), ("three", (3,))])
def test_count_subsets_keep_the_scenes_of_those_counts_of_their_split(subset: str, counts: tuple[int, ...]) -> None:
    from diffusion_env.prompts import make_prompt_set

    for split, pairs in (("train", train_prompts()), ("heldout", heldout_prompts())):
        kept = make_prompt_set(f"scenes_{split}_{subset}")
        expected = [(p, m) for p, m in pairs if m["count"] in counts]
        assert kept.name == f"scenes_{split}_{subset}"
        assert kept.prompts == [p for p, _ in expected] and kept.metadata == [m for _, m in expected]
        # Counts 1, 2 and 3 appear equally often in each split.
        assert len(kept) == len(pairs) * len(counts) // 3


@pytest.mark.parametrize("subset", ["", "_several", "_three"])
def test_heldout_counterpart_has_the_same_counts_on_combinations_never_trained_on(subset: str) -> None:
    from diffusion_env.prompts import make_prompt_set
    from diffusion_env.shapes import heldout_counterpart

    train, held = make_prompt_set(f"scenes_train{subset}"), make_prompt_set(heldout_counterpart(f"scenes_train{subset}"))
    assert held.name == f"scenes_heldout{subset}"
    assert {m["count"] for m in held.metadata} == {m["count"] for m in train.metadata}

    def triples(prompt_set):
        return {(m["color"], m["shape"], m["background"]) for m in prompt_set.metadata}

    assert not triples(train) & triples(held)


def test_heldout_counterpart_is_none_for_sets_without_one() -> None:
    from diffusion_env.shapes import heldout_counterpart

    assert heldout_counterpart("scenes_heldout") is None
    assert heldout_counterpart("scenes_train_four") is None  # no such registered set
    assert heldout_counterpart("my_prompts") is None


def test_split_is_fixed() -> None:
    held = sorted(heldout_triples())
    assert held == sorted(heldout_triples())
    # Pins the exact split; changing it invalidates earlier held-out results.
    digest = hashlib.sha256(repr(held).encode()).hexdigest()
    assert digest == "f3e503e4e7cdbe5015f745d10252d13e38999171100a6e7b2f207355028d83e5"


# --------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------


def test_parser_accuracy_on_ground_truth(
    batch: tuple[np.ndarray, list[str], list[Scene]],
) -> None:
    images, _, scenes = batch
    acc = attribute_agreement(parse_scenes(images), [s.metadata for s in scenes])
    print(f"\nparser accuracy, clean ({N_PARSE} scenes): {acc}")
    for key in ("background", "color", "shape", "count", "size"):
        assert acc[key] >= 0.98, (key, acc)


def test_parser_accuracy_with_noise(batch: tuple[np.ndarray, list[str], list[Scene]]) -> None:
    images, _, scenes = batch
    rng = np.random.default_rng(99)
    noisy = np.clip(images + rng.normal(0.0, 8.0, images.shape), 0, 255).round()
    acc = attribute_agreement(parse_scenes(noisy.astype(np.uint8)), [s.metadata for s in scenes])
    print(f"\nparser accuracy, Gaussian noise sigma=8/255 ({N_PARSE} scenes): {acc}")
    for key in ("background", "color", "shape", "count", "size"):
        assert acc[key] >= 0.90, (key, acc)


def test_parser_accuracy_with_blur(batch: tuple[np.ndarray, list[str], list[Scene]]) -> None:
    # A [1, 2, 1] blur mimics the soft edges of diffusion samples.
    images, _, scenes = batch
    padded = np.pad(images.astype(float), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    k = np.array([0.25, 0.5, 0.25])
    blurred = sum(
        k[dy] * k[dx] * padded[:, dy : dy + 32, dx : dx + 32] for dy in range(3) for dx in range(3)
    )
    acc = attribute_agreement(
        parse_scenes(np.round(blurred).astype(np.uint8)), [s.metadata for s in scenes]
    )
    print(f"\nparser accuracy, [1,2,1] blur ({N_PARSE} scenes): {acc}")
    for key in ("background", "color", "shape", "count", "size"):
        assert acc[key] >= 0.95, (key, acc)


def test_parse_flat_and_speckled_images() -> None:
    rng = np.random.default_rng(2)
    for name, rgb in PALETTE.items():
        flat = np.empty((32, 32, 3), dtype=np.uint8)
        flat[...] = rgb
        assert parse_scene(flat) == ParsedScene(name, None, None, 0, None)
        # Isolated specks of another colour are ignored.
        other = PALETTE["black" if name != "black" else "white"]
        ys, xs = rng.integers(2, 30, size=(2, 5))
        flat[ys, xs] = other
        assert parse_scene(flat).count == 0


def test_parse_known_scene() -> None:
    scene = Scene("blue", "yellow", "triangle", 2, "large", ((0.25, 0.25), (0.75, 0.75)), 6 / 32)
    assert parse_scene(render_scene(scene)) == ParsedScene(
        "blue", "yellow", "triangle", 2, "large"
    )
    # Scale-free: the same scene at 64 px parses the same.
    assert parse_scene(render_scene(scene, 64)) == parse_scene(render_scene(scene))


def test_parse_rejects_bad_input() -> None:
    good = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="dtype must be uint8.*got float32"):
        parse_scene(good.astype(np.float32))
    with pytest.raises(ValueError, match=r"shape must be \(H, W, 3\).*got \(32, 32\)"):
        parse_scene(good[..., 0])
    with pytest.raises(ValueError, match=r"shape must be \(H, W, 3\).*got \(32, 32, 4\)"):
        parse_scene(np.zeros((32, 32, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="must be >= 8"):
        parse_scene(np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="numpy.ndarray"):
        parse_scene(good.tolist())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"shape \(B, H, W, 3\).*shape \(32, 32, 3\)"):
        parse_scenes(good)
    with pytest.raises(ValueError, match="dtype must be uint8"):
        parse_scenes(good[None].astype(np.int64))


def test_attribute_agreement(batch: tuple[np.ndarray, list[str], list[Scene]]) -> None:
    images, _, scenes = batch
    parsed = parse_scenes(images[:20])
    meta = [s.metadata for s in scenes[:20]]
    agreement = attribute_agreement(parsed, meta)
    assert set(agreement) == {"background", "color", "shape", "count", "size", "all"}
    assert all(0.0 <= v <= 1.0 for v in agreement.values())
    # Shifting the metadata pairs each image with another scene's prompt.
    shifted = attribute_agreement(parsed, meta[1:] + meta[:1])
    assert shifted["all"] < agreement["all"]
    matches = attribute_matches(parsed, meta)
    assert matches["all"].shape == (20,) and matches["all"].dtype == bool
    with pytest.raises(ValueError, match="same length"):
        attribute_agreement(parsed, meta[:-1])
    with pytest.raises(ValueError, match="at least one"):
        attribute_agreement([], [])
    with pytest.raises(ValueError, match=r"missing keys \['size'\]"):
        attribute_agreement(parsed[:1], [{k: v for k, v in meta[0].items() if k != "size"}])
