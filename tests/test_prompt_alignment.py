"""The DDPO prompt-alignment reward: BERTScore recall, the scene and BLIP captioners, the registry."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from transformers import (
    AutoTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
)

from diffusion_env.shapes import scenes
from diffusion_env.rewards.prompt_alignment import (
    DDPO_QUESTION,
    BertScoreRecall,
    Captioner,
    PromptAlignmentReward,
    TransformersCaptioner,
)
from diffusion_env.shapes import SceneParserCaptioner
from diffusion_env.rewards import RewardError, available_rewards, make_reward
from diffusion_env.backends.text_encoders import minilm_path

PROMPT = "a small red circle on a blue background"


@pytest.fixture(scope="module")
def scorer():
    return BertScoreRecall()


def rendered(count, seed=0, size=32):
    """Ground-truth scenes ``(count, size, size, 3)`` uint8 and their captions."""
    rng = np.random.default_rng(seed)
    drawn = [scenes.sample_scene(rng) for _ in range(count)]
    images = torch.from_numpy(np.stack([scenes.render_scene(scene, size=size) for scene in drawn]))
    return images, [scenes.caption(scene) for scene in drawn]


def test_identical_texts_have_recall_one(scorer):
    texts = [PROMPT, "two large yellow squares on a black background", "hello"]
    np.testing.assert_allclose(scorer(texts, texts), np.ones(3), atol=1e-5)


def test_recall_is_asymmetric_extra_caption_words_cost_precision_not_recall(scorer):
    caption = PROMPT + " next to a tall green tree under a cloudy sky"
    recall = scorer([caption], [PROMPT])[0]
    precision = scorer([PROMPT], [caption])[0]  # swapping the roles gives BERTScore precision
    # Contextual embeddings: the extra words shift the prompt's tokens a little (0.88 with MiniLM).
    assert recall > 0.85 and precision < recall - 0.2


def test_paraphrases_score_higher_than_unrelated_text(scorer):
    paraphrase, unrelated = scorer(
        ["one little red disc on a blue backdrop", "the stock market fell sharply on tuesday"], [PROMPT, PROMPT]
    )
    assert paraphrase > unrelated + 0.2


def test_scores_do_not_depend_on_batching_or_padding(scorer):
    candidates = [PROMPT, "a cat", "three small green triangles on an orange background and more words"]
    references = [PROMPT, PROMPT, "three small green triangles"]
    together = scorer(candidates, references)
    small_batches = BertScoreRecall(batch_size=1)(candidates, references)
    assert together.dtype == np.float32 and together.shape == (3,)
    np.testing.assert_allclose(together, small_batches, atol=1e-5)


def test_the_embedding_cache_is_bounded_and_changes_no_score():
    candidates = [PROMPT, "a cat", "two large yellow squares", PROMPT]
    references = ["a cat on a mat", PROMPT, "three squares", "a small circle"]
    cached = BertScoreRecall(cache_size=3)
    first, again = cached(candidates, references), cached(candidates, references)
    # Equal up to the last bit: a recomputed text is padded in another batch, with other GEMM shapes.
    np.testing.assert_allclose(first, BertScoreRecall(cache_size=0)(candidates, references), atol=1e-6)
    np.testing.assert_allclose(first, again, atol=1e-6)
    assert len(cached._cache) == 3
    with pytest.raises(ValueError, match="cache_size must be an int >= 0"):
        BertScoreRecall(cache_size=-1)


def test_an_empty_candidate_scores_zero_and_an_empty_reference_raises(scorer):
    np.testing.assert_array_equal(scorer(["", "   "], [PROMPT, PROMPT]), np.zeros(2, dtype=np.float32))
    with pytest.raises(ValueError, match=r"references \[1\] are empty"):
        scorer([PROMPT, PROMPT], [PROMPT, ""])
    with pytest.raises(ValueError, match="one reference per candidate"):
        scorer([PROMPT], [PROMPT, PROMPT])
    with pytest.raises(TypeError, match="sequence of str"):
        scorer(PROMPT, PROMPT)


def test_the_scene_captioner_repeats_a_ground_truth_caption():
    images, captions = rendered(12)
    assert isinstance(SceneParserCaptioner(), Captioner)
    assert SceneParserCaptioner()(images) == captions


def test_the_scene_captioner_describes_a_plain_image_by_its_background():
    plain = torch.from_numpy(np.broadcast_to(scenes.PALETTE["orange"], (1, 16, 16, 3)).astype(np.uint8).copy())
    assert SceneParserCaptioner()(plain) == ["an orange background"]
    with pytest.raises(ValueError, match=r"uint8 torch tensor \(B, H, W, 3\)"):
        SceneParserCaptioner()(plain.float())


def test_own_captions_score_higher_than_other_scenes_captions():
    images, captions = rendered(16, seed=3)
    reward = PromptAlignmentReward(SceneParserCaptioner())
    own, details = reward(images, captions, [{}] * 16)
    others, _ = reward(images, captions[1:] + captions[:1], [{}] * 16)
    np.testing.assert_allclose(own, np.ones(16), atol=1e-5)
    assert own.mean() > others.mean() + 0.05
    assert details["captions"].dtype == object and list(details["captions"]) == captions
    np.testing.assert_array_equal(details["bertscore_recall"], own)


def test_prompt_alignment_is_registered_and_runs_in_the_vector_env():
    assert "prompt_alignment" in available_rewards()
    env = gym.make_vec("DiffusionDenoise-v0", num_envs=2, model="tiny-random", num_inference_steps=2,
                       reward="prompt_alignment")
    try:
        env.reset(seed=0)
        terminated = np.zeros(2, dtype=bool)
        while not terminated.all():
            _, rewards, terminated, _, info = env.step(env.action_space.sample())
    finally:
        env.close()
    assert np.isfinite(rewards).all() and (np.abs(rewards) <= 1 + 1e-5).all()
    assert info["reward_details"]["captions"].shape == (2,)
    assert all(isinstance(caption, str) for caption in info["reward_details"]["captions"])


def test_a_captioner_returning_the_wrong_number_of_captions_is_reported():
    reward = make_reward(PromptAlignmentReward(captioner=lambda images: ["only one"]))
    images, captions = rendered(2)
    with pytest.raises(RewardError, match="one str per image"):
        reward(images, captions, [{}, {}])


# A tiny random BLIP with the MiniLM tokenizer (a BERT WordPiece, as BLIP's own): random text,
# but the real generation path, offline.


@pytest.fixture(scope="module")
def blip():
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    # BLIP's own [DEC] bos token is an extra id past the BERT vocabulary; [CLS] stands in for it here.
    text = dict(
        small,
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=64,
        bos_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = BlipConfig(text_config=text, vision_config=dict(small, image_size=32, patch_size=8), projection_dim=8)
    torch.manual_seed(0)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    return BlipForConditionalGeneration(config), processor


def spy_on_generate(model, monkeypatch):
    """The keyword arguments of each later ``model.generate`` call, recorded in a list."""
    calls, generate = [], model.generate

    def recording_generate(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    return calls


def random_images(batch=5, height=20, width=24):
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, height, width, 3), dtype=np.uint8))


def test_the_blip_captioner_asks_the_question_in_batches_and_returns_only_the_answer(blip, monkeypatch):
    model, processor = blip
    calls = spy_on_generate(model, monkeypatch)
    captioner = TransformersCaptioner(model, processor, max_new_tokens=4, batch_size=2)
    captions = captioner(random_images())
    assert isinstance(captions, list) and len(captions) == 5 and all(isinstance(c, str) for c in captions)
    assert [len(call["pixel_values"]) for call in calls] == [2, 2, 1]
    asked = processor.batch_decode(calls[0]["input_ids"], skip_special_tokens=True)
    assert asked == [DDPO_QUESTION, DDPO_QUESTION]
    # At most max_new_tokens word pieces each, none of them the echoed question.
    assert all(len(processor.tokenizer.tokenize(caption)) <= 4 for caption in captions)
    assert not any(caption.startswith("what is going on") for caption in captions)


def test_the_blip_captioner_without_a_question_captions_unconditionally(blip, monkeypatch):
    model, processor = blip
    calls = spy_on_generate(model, monkeypatch)
    captions = TransformersCaptioner(model, processor, question=None, max_new_tokens=3)(random_images(batch=2))
    assert len(captions) == 2 and "input_ids" not in calls[0]


def test_the_blip_reward_is_finite_and_within_the_cosine_range(blip, scorer):
    model, processor = blip
    reward = make_reward(PromptAlignmentReward(TransformersCaptioner(model, processor, max_new_tokens=4), scorer))
    result = reward(random_images(batch=3), [PROMPT] * 3, [{}] * 3)
    assert result.rewards.shape == (3,) and torch.isfinite(result.rewards).all()
    assert (result.rewards.abs() <= 1 + 1e-5).all()
    assert result.details["captions"].shape == (3,)


def test_the_transformers_captioner_rejects_what_it_cannot_use(blip):
    model, processor = blip
    with pytest.raises(TypeError, match="no generate method"):
        TransformersCaptioner(torch.nn.Linear(2, 2), processor)
    with pytest.raises(ValueError, match="question must be a non-empty string or None"):
        TransformersCaptioner(model, processor, question="  ")
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        TransformersCaptioner(model, processor, max_new_tokens=0)
