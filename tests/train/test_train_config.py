import dataclasses
import math

import pytest
import yaml

from reddino_train.config import (
    ConfigError,
    TrainConfig,
    changed_settings,
    check_architecture,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
    shipped_configs,
    valid_keys,
)


def test_shipped_configs_all_load():
    names = shipped_configs()
    assert names == [
        "dinov2-vitb14", "dinov2-vitl14", "dinov2-vits14",
        "reddino-cpu-small", "reddino-vitb14", "reddino-vitl14", "reddino-vits14", "tiny",
    ]
    for name in names:
        assert isinstance(load_config(name), TrainConfig)


def test_dinov2_default_recipe_numbers():
    # facebookresearch/dinov2, dinov2/configs/ssl_default_config.yaml
    cfg = load_config("dinov2-vits14")
    assert (cfg.heads.dino.n_prototypes, cfg.heads.dino.bottleneck_dim) == (65536, 256)
    assert (cfg.heads.dino.hidden_dim, cfg.heads.dino.n_layers) == (2048, 3)
    assert cfg.heads.ibot_separate is False
    assert (cfg.loss.koleo_weight, cfg.loss.ibot_weight, cfg.loss.centering) == (0.1, 1.0, "softmax_center")
    assert (cfg.loss.dino_weight, cfg.loss.student_temp, cfg.loss.center_momentum) == (1.0, 0.1, 0.9)
    m = cfg.model
    assert (m.drop_path_rate, m.drop_path_uniform, m.layerscale, m.patch_size) == (0.3, True, 1e-5, 14)
    assert (cfg.crops.local_size, cfg.optim.adamw_betas) == (98, (0.9, 0.999))  # 96 in Meta's, a multiple of 14 here
    assert (cfg.masking.sample_probability, cfg.masking.ratio_min_max) == (0.5, (0.1, 0.5))
    assert (cfg.teacher.momentum, cfg.teacher.final_momentum) == (0.992, 1.0)
    assert (cfg.teacher.warmup_temp, cfg.teacher.temp, cfg.teacher.warmup_temp_epochs) == (0.04, 0.07, 30)
    o = cfg.optim
    assert (o.epochs, o.base_lr, o.min_lr, o.warmup_epochs) == (100, 4e-3, 1e-6, 10)
    assert (o.weight_decay, o.weight_decay_end, o.clip_grad) == (0.04, 0.4, 3.0)
    assert (o.freeze_last_layer_epochs, o.layerwise_decay, o.patch_embed_lr_mult) == (1, 0.9, 0.2)
    c = cfg.crops
    assert (c.global_size, c.global_scale, c.local_number, c.local_scale) == (224, (0.32, 1.0), 8, (0.05, 0.32))
    assert (cfg.train.batch_size_per_gpu, cfg.train.iterations_per_epoch) == (64, 1250)


def test_dinov2_vitl14_numbers():
    # facebookresearch/dinov2, dinov2/configs/train/vitl14.yaml
    cfg = load_config("dinov2-vitl14")
    assert cfg.model.arch == "vit_large_patch14_dinov2"
    assert cfg.model.drop_path_rate == 0.4
    assert (cfg.heads.dino.n_prototypes, cfg.heads.dino.bottleneck_dim) == (131072, 384)
    assert (cfg.heads.ibot.n_prototypes, cfg.heads.ibot.bottleneck_dim) == (131072, 256)
    assert cfg.heads.ibot_separate and cfg.loss.centering == "sinkhorn_knopp"
    assert cfg.teacher.momentum == 0.994
    o = cfg.optim
    assert (o.epochs, o.base_lr, o.warmup_epochs, o.weight_decay_end, o.layerwise_decay) == (
        500, 2e-4, 80, 0.2, 1.0)
    assert (cfg.crops.local_size, cfg.train.batch_size_per_gpu) == (98, 32)


@pytest.mark.parametrize(
    ("name", "arch", "batch", "epoch_length"),
    [
        ("reddino-vits14", "vit_small_patch14_dinov2", 280, 3200),
        ("reddino-vitb14", "vit_base_patch14_dinov2", 196, 7300),
        ("reddino-vitl14", "vit_large_patch14_dinov2", 64, 21800),
    ],
)
def test_reddino_recipes(name, arch, batch, epoch_length):
    # Snarci/RedDino, train/dinov2/configs/train/deployment/1_gpu/{s,b,l}.yaml
    cfg = load_config(name)
    assert (cfg.model.arch, cfg.train.batch_size_per_gpu, cfg.train.iterations_per_epoch) == (
        arch, batch, epoch_length)
    assert cfg.model.pretrained == "timm"
    assert cfg.loss.koleo_weight == 0.0 and cfg.loss.centering == "sinkhorn_knopp"
    assert cfg.heads.dino.n_prototypes == 131072 and not cfg.heads.ibot_separate
    assert cfg.crops.augmentation == "rbc"
    # as RedDino's code trained: its one local crop never reached the loss, which took half the
    # mean over the two global pairs; its hub-built models had no stochastic depth
    assert (cfg.crops.local_number, cfg.loss.dino_weight, cfg.model.drop_path_rate) == (0, 0.5, 0.0)
    # the 13 kinds of RedDino's 33 that torchvision makes, 2 a crop (see reddino_train.augment)
    assert len(cfg.crops.pixel_augmentations) == 13 and cfg.crops.pixel_augmentations_per_crop == 2
    o = cfg.optim
    assert (o.epochs, o.base_lr, o.warmup_epochs, o.freeze_last_layer_epochs) == (10, 2e-4, 0.1, 0)
    assert (o.weight_decay_end, o.layerwise_decay, cfg.teacher.momentum) == (0.2, 1.0, 0.994)


def test_overrides_are_typed():
    cfg = load_config(
        "tiny",
        ["optim.base_lr=1e-3", "masking.ratio_min_max=[0.2, 0.4]", "model.depth=null",
         "heads.ibot_separate=true", "loss.centering=softmax_center", "train.seed=7"],
    )
    assert cfg.optim.base_lr == 0.001 and isinstance(cfg.optim.base_lr, float)
    assert cfg.masking.ratio_min_max == (0.2, 0.4)
    assert cfg.model.depth is None
    assert cfg.heads.ibot_separate is True
    assert cfg.loss.centering == "softmax_center"
    assert cfg.train.seed == 7


def test_unknown_override_lists_valid_keys():
    with pytest.raises(ConfigError) as error:
        load_config("tiny", ["optim.lr=1e-3"])
    message = str(error.value)
    assert "unknown key optim.lr in overrides" in message
    for key in valid_keys(TrainConfig):
        assert (key in message) == key.startswith("optim.")


def test_unknown_section_lists_sections(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("base: tiny\noptimizer:\n  base_lr: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key optimizer in .*mine.yaml .*did you mean optim") as error:
        load_config(recipe)
    assert "model, heads, loss, masking, teacher, optim, crops, train" in str(error.value)


def test_bad_values_are_errors():
    with pytest.raises(ConfigError, match="train.batch_size_per_gpu=2.5; expected int"):
        load_config("tiny", ["train.batch_size_per_gpu=2.5"])
    with pytest.raises(ConfigError, match="choose one of: softmax_center, sinkhorn_knopp"):
        load_config("tiny", ["loss.centering=center"])
    with pytest.raises(ConfigError, match="crops.local_size=96 is not a multiple of model.patch_size=14"):
        load_config("tiny", ["crops.local_size=96"])
    with pytest.raises(ConfigError, match="optim in overrides is a section; set its keys: optim.epochs"):
        load_config("tiny", ["optim=1"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config("tiny", ["optim.base_lr"])
    for key in ("log_every", "checkpoint_every", "batch_size_per_gpu"):
        with pytest.raises(ConfigError, match=rf"train.{key}=0 must be at least 1"):
            load_config("tiny", [f"train.{key}=0"])
    # Each of these once passed the check and failed later: at step 1, as NaN taken for a diverged
    # run, or as "0 iterations done".
    for override, says in (("train.seed=-1", "train.seed=-1 must be 0 or more"),
                           ("train.num_workers=-2", "train.num_workers=-2 must be 0 or more"),
                           ("train.checkpoint_minutes=-5", r"train.checkpoint_minutes=-5.0 must be 0 or more"),
                           ("optim.epochs=0", "optim.epochs=0 must be at least 1"),
                           ("teacher.temp=0", "teacher.temp=0.0 must be above 0"),
                           ("teacher.warmup_temp=-0.04", "teacher.warmup_temp=-0.04 must be above 0"),
                           ("loss.student_temp=0", "loss.student_temp=0.0 must be above 0"),
                           ("model.patch_size=0", "model.patch_size=0 must be at least 1"),
                           ("crops.global_size=0", "crops.global_size=0 must be at least 1"),
                           ("crops.local_number=-1", "crops.local_number=-1 must be 0 or more"),
                           ("heads.ibot.n_layers=0", "heads.ibot.n_layers=0 must be at least 1"),
                           ("heads.dino.n_prototypes=0", "heads.dino.n_prototypes=0 must be at least 1"),
                           ("optim.base_lr=.nan", r"optim.base_lr=nan: each must be a finite number"),
                           ("loss.koleo_weight=.inf", r"loss.koleo_weight=inf: each must be a finite number"),
                           ("teacher.momentum=1.5", r"teacher.momentum=1.5 must lie between 0 and 1"),
                           ("teacher.final_momentum=-1", r"teacher.final_momentum=-1.0 must lie between 0 and 1"),
                           ("loss.center_momentum=2", r"loss.center_momentum=2.0 must lie between 0 and 1"),
                           ("optim.adamw_betas=[0.9, 1.5]", r"optim.adamw_betas\[1\]=1.5 must lie between 0 and 1"),
                           ("optim.base_lr=-1e-3", r"optim.base_lr=-0.001 must be 0 or more"),
                           ("optim.weight_decay_end=-0.1", r"optim.weight_decay_end=-0.1 must be 0 or more"),
                           ("loss.koleo_weight=-0.1", r"loss.koleo_weight=-0.1 must be 0 or more"),
                           ("optim.layerwise_decay=9", r"optim.layerwise_decay=9.0 must lie between 0 \(the heads "
                                                       r"alone learn\) and 1 \(no decay\)"),
                           ("optim.layerwise_decay=-0.1", r"optim.layerwise_decay=-0.1 must lie between 0 \(the heads "
                                                          r"alone learn\) and 1 \(no decay\)"),
                           ("optim.patch_embed_lr_mult=-1", r"optim.patch_embed_lr_mult=-1.0 must be 0 or more"),
                           ("optim.base_lr=[", r"override 'optim.base_lr=\[': its value is not valid YAML \(expected "
                                               r"the node content, but found '<stream end>' at line 1, column 2\)")):
        with pytest.raises(ConfigError, match=rf"^{says}$"):
            load_config("tiny", [override])
    assert load_config("tiny", ["train.num_workers=0", "train.seed=0"]).train.seed == 0
    # "never": a saved config may say so, and must still resume
    assert load_config("tiny", ["optim.clip_grad=.inf", "train.checkpoint_minutes=.inf"]).optim.clip_grad == math.inf
    typo = load_config("tiny", ["model.arch=vit_smal_patch14_dinov2"])  # read without timm; refused before a run
    with pytest.raises(ConfigError, match=r"model.arch='vit_smal_patch14_dinov2' is not a timm architecture"):
        check_architecture(typo)
    # the ends of the ranges: a teacher that no longer moves, no layer-wise decay, no weight decay, the
    # heads alone learning, a frozen patch embedding
    edges = load_config("tiny", ["teacher.final_momentum=1", "optim.layerwise_decay=1", "optim.weight_decay=0",
                                 "model.layerscale=0", "teacher.momentum=0", "optim.patch_embed_lr_mult=0"])
    assert (edges.teacher.final_momentum, edges.optim.layerwise_decay, edges.optim.weight_decay) == (1, 1, 0)
    assert load_config("tiny", ["optim.layerwise_decay=0"]).optim.layerwise_decay == 0
    # A run an earlier version trained with a value out of range still reads (and so exports).
    saved = config_to_dict(load_config("tiny"))
    saved["optim"]["layerwise_decay"] = 1.5
    assert config_from_dict(saved).optim.layerwise_decay == 1.5
    # An unused warm-up temperature is not checked: saved runs with one of 0 resume as before.
    assert load_config("tiny", ["teacher.warmup_temp_epochs=0", "teacher.warmup_temp=0"]).teacher.warmup_temp == 0


def test_pixel_augmentation_pool_is_checked():
    cfg = load_config("tiny", ["crops.pixel_augmentations=[blur, grayscale]",
                               "crops.pixel_augmentations_per_crop=1"])
    assert cfg.crops.pixel_augmentations == ("blur", "grayscale")
    with pytest.raises(ConfigError, match="pixel_augmentations='rotate'; choose one of: colour_jitter, blur"):
        load_config("tiny", ["crops.pixel_augmentations=[blur, rotate]"])
    with pytest.raises(ConfigError, match="per_crop=2 must lie between 0 and the 1 pixel_augmentations"):
        load_config("tiny", ["crops.pixel_augmentations=[blur]"])  # tiny draws 2
    with pytest.raises(ConfigError, match="expected a list"):
        load_config("tiny", ["crops.pixel_augmentations=blur"])
    with pytest.raises(ConfigError, match=r"\['blur', 'blur'\] names one twice"):
        load_config("tiny", ["crops.pixel_augmentations=[blur, blur]", "crops.pixel_augmentations_per_crop=1"])
    # one override switches to dinov2's fixed pipeline, which ignores the pool
    assert load_config("tiny", ["crops.augmentation=dinov2"]).crops.augmentation == "dinov2"


@pytest.mark.parametrize("name", ["reddino-vits14", "dinov2-vits14"])
def test_configs_saved_before_the_pool_was_configurable_still_load(name, tmp_path):
    # checkpoints and config.yaml of earlier versions hold no pixel_augmentations: they drew 4
    # from the whole pool
    cfg = load_config(name)
    saved = config_to_dict(cfg)
    del saved["crops"]["pixel_augmentations"], saved["crops"]["pixel_augmentations_per_crop"]
    then = dataclasses.replace(cfg, crops=dataclasses.replace(
        cfg.crops, pixel_augmentations=("colour_jitter", "blur", "sharpness", "autocontrast", "equalize", "posterize",
                                        "solarize", "invert", "channel_permutation", "grayscale"),
        pixel_augmentations_per_crop=4))
    assert config_from_dict(saved) == then != cfg
    old_file = tmp_path / "config.yaml"
    old_file.write_text(yaml.safe_dump(saved))
    assert load_config(old_file) == then


def test_user_recipe_inherits_and_round_trips(tmp_path):
    recipe = tmp_path / "smears.yaml"
    recipe.write_text("base: reddino-vitb14\ntrain:\n  batch_size_per_gpu: 128\n")
    cfg = load_config(recipe, ["optim.epochs=3"])
    assert (cfg.model.arch, cfg.train.batch_size_per_gpu, cfg.optim.epochs) == (
        "vit_base_patch14_dinov2", 128, 3)
    saved = tmp_path / "run" / "config.yaml"
    saved.parent.mkdir()
    save_config(cfg, saved)
    assert load_config(saved) == cfg
    assert config_to_dict(cfg)["masking"]["ratio_min_max"] == [0.1, 0.5]


def test_a_recipe_that_is_not_yaml_says_where(tmp_path):
    (tmp_path / "broken.yaml").write_text("base: tiny\noptim:\n  base_lr: [1e-3\n")
    with pytest.raises(ConfigError, match=r"broken.yaml is not valid YAML: expected ',' or '\]', but got '<stream end>' "
                                          r"at line 4, column 1"):
        load_config(tmp_path / "broken.yaml")


def test_a_section_or_key_written_twice_in_a_recipe_is_refused_where_it_is(tmp_path):
    # YAML keeps the last of two: the first section's learning rate would be lost without a word.
    (tmp_path / "twice.yaml").write_text("base: tiny\noptim: {base_lr: 1.0e-3}\ntrain: {num_workers: 0}\n"
                                         "optim: {epochs: 3}\n")
    with pytest.raises(ConfigError, match=r"twice.yaml is not valid YAML: 'optim' is written twice in one section at "
                                          r"line 4, column 1"):
        load_config(tmp_path / "twice.yaml")
    (tmp_path / "key.yaml").write_text("base: tiny\noptim:\n  epochs: 3\n  epochs: 4\n")
    with pytest.raises(ConfigError, match=r"'epochs' is written twice in one section at line 4, column 3"):
        load_config(tmp_path / "key.yaml")
    # A key of one name in two sections is not twice, nor is one that a YAML merge key (<<) brings and the
    # section sets again (set, it wins, as YAML has it), nor two merge keys (PyYAML merges both)
    (tmp_path / "merged.yaml").write_text("base: tiny\nteacher: {temp: 0.05}\n"
                                          "loss:\n  <<: {student_temp: 0.05, koleo_weight: 0.2}\n  <<: {dino_weight: 0.5}\n"
                                          "  student_temp: 0.06\n")
    merged = load_config(tmp_path / "merged.yaml")
    assert (merged.teacher.temp, merged.loss.student_temp, merged.loss.koleo_weight, merged.loss.dino_weight) == (
        0.05, 0.06, 0.2, 0.5)


def test_an_empty_value_for_a_text_key_is_empty_text():
    # `model.pretrained=""` reaches the program as `model.pretrained=`: random weights, as the README says
    assert load_config("reddino-vits14", ['model.pretrained=']).model.pretrained == ""
    assert load_config("tiny", ["model.depth="]).model.depth is None  # a number's empty value stays "none"


def test_incomplete_and_cyclic_recipes(tmp_path):
    partial = tmp_path / "partial.yaml"
    partial.write_text("optim:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="missing config keys: model,"):
        load_config(partial)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="inherits from itself"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="shipped configs: dinov2-vitb14"):
        load_config("no-such-recipe")


def test_cpu_small_recipe_builds_its_narrow_vit():
    from reddino_train.model import build_student

    vit = build_student(load_config("reddino-cpu-small")).backbone.vit
    assert vit.patch_embed.patch_size == (8, 8) and vit.embed_dim == 192 and len(vit.blocks) == 6
    assert vit.blocks[0].attn.num_heads == 3 and vit.patch_embed.grid_size == (6, 6)


def test_a_resume_that_changes_how_the_run_is_looked_after_changes_none_of_its_settings():
    """Loader workers, log rows and checkpoint times differ from node to node and scheduler to
    scheduler; a change to them is no change to the training, named in no warning."""
    run = load_config("tiny")
    looked_after = load_config("tiny", ["train.num_workers=4", "train.log_every=5", "train.checkpoint_every=7",
                                        "train.checkpoint_minutes=30", "train.keep_checkpoints=2"])
    assert changed_settings(run, looked_after) == []
    assert changed_settings(run, load_config("tiny", ["train.num_workers=4", "train.batch_size_per_gpu=3"])) == [
        f"train.batch_size_per_gpu: {run.train.batch_size_per_gpu} -> 3"]
