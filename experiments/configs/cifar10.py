"""The reference recipe for CIFAR-10 (and CIFAR-100 via ``dataset=cifar100``).

Usage: ``--config experiments/configs/cifar10.py:model=resnet50,loss=flsd53``;
single fields also with ``--config.num_epochs=2``. Defaults are the paper's
(``shared/docs/paper.md``): SGD momentum 0.9, lr 0.1 x0.1 at epochs 150 and
250, 350 epochs, batch 128, weight decay 5e-4, gradient clipping at 2, batch
*summed* losses.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "cifar10"
    c.data_dir = ""              # "" = $CALIB_JAX_DATA_DIR, then ../shared/data, then TFDS
    c.model = "resnet50"
    # ce focal flsd53 flsd52 flsc531 brier mmce_weighted label_smoothing, or a list trained
    # as one vmapped program, each member in <workdir>/<loss>: "[ce,brier,focal3,flsd53]"
    # (focal<g> = focal loss with gamma g).
    c.loss = "ce"
    c.gamma = 3.0                # for loss=focal
    c.mmce_lambda = 2.0
    c.smoothing = 0.05
    c.num_epochs = 350
    c.batch_size = 128           # global: divided over all devices of all hosts
    c.eval_batch_size = 500
    c.learning_rate = 0.1
    c.lr_boundaries = (150, 250)
    c.lr_factor = 0.1
    c.early_decay = False        # True: the reference's one-epoch-early decay (149, 249)
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.clip_norm = 2.0
    c.dtype = "float32"          # compute dtype: float32 or bfloat16
    c.augment = True
    c.train_subset = 0           # 0 = the whole training split; N = a seeded subset of N
    c.seed = 1
    c.seeds = ()                 # several seeds: members <loss>-seed<s> in one program
    # How several members share the program: vmap (batched: grouped convolutions), sequential
    # (one after another), auto = sequential on CPU and GPU (faster on both, measured on an
    # H200), vmap on TPU (unmeasured).
    c.multi_mode = "auto"
    c.checkpoint_every_epochs = 10
    c.keep_checkpoints = 3
    # The checkpoint that the evaluation pass (and so the sweep's tables) reports: "final" (the
    # last epoch, the reference's CIFAR / Tiny-ImageNet protocol) or "best" (the highest
    # validation accuracy: its 20 Newsgroups and SST protocol).
    c.eval_checkpoint = "final"
    c.log_every_steps = 50
    # Training steps per compiled call (lax.scan, batches built on the device, no host work
    # in between). 0 = automatic: on GPU / TPU the divisor of the epoch's steps nearest
    # below log_every_steps (one compilation per run), 1 on CPU (XLA:CPU runs convolutions
    # inside loops slowly, jax-ml/jax#12868). See train.default_steps_per_call.
    c.steps_per_call = 0
    # lax.scan's unroll of those steps. 0 = automatic: 2 for one run on GPU (measured ~5%
    # faster on an H200), 1 otherwise. See train.default_unroll.
    c.scan_unroll = 0
    # How those steps hold the parameters: auto = one flat vector on GPU (fewer kernels per
    # step; measured with the next option +4.8% on an H200), their own tree elsewhere (the
    # vector is slower on CPU); or flat / tree. Checkpoints hold the tree either way. See
    # train.default_flat_params.
    c.param_layout = "auto"
    # GPU only: XLA records cuDNN's convolutions into its CUDA graphs (fewer gaps between
    # kernels). False keeps XLA's default; so does an XLA_FLAGS that sets
    # xla_gpu_enable_command_buffer itself. See train.loop_compiler_options.
    c.gpu_graph_convolutions = True
    c.reference_cifar100_test_norm = True
    c.optimizer = "sgd"          # sgd | adam | adagrad
    c.loss_mean = False          # True: mean instead of the reference's batch sums
    c.flsd_threshold = 0.2       # lower FLSD tier bound (the reference's text runs: 0.19)
    c.gamma_boundaries = (100, 250)  # FLSc-531 switches (the reference's SST runs: 3, 7)
    # Text models only.
    c.vocab_size = 20000
    c.embed_dim = 100
    c.embeddings_path = ""       # a [vocab_size, embed_dim] .npy (e.g. GloVe); "" = random
    c.train_embeddings = True
    c.mem_dim = 150              # Tree-LSTM memory size (the reference's constituency model)
    c.phrase_labels = False      # SST: train on every labelled phrase (3-class head), see sst.py
    return c


def split_overrides(arg: str) -> list[str]:
    """``"a=1,loss=[ce,brier],b=2"`` -> ``["a=1", "loss=[ce,brier]", "b=2"]`` (commas inside
    brackets belong to the value)."""
    items, depth, current = [], 0, ""
    for char in arg:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    if depth != 0:
        raise ValueError(f"config overrides {arg!r}: unbalanced brackets")
    return items + [current]


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _cast(key: str, current, value: str):
    """``value`` (text) as the type of config field ``key``'s ``current`` value; a value
    that is not of that type raises naming the field (never a silent default: a typo such
    as ``early_decay=ture`` must not train with ``False``)."""
    kind = {"bool": "a boolean", "int": "an integer", "float": "a number"}.get(
        type(current).__name__, type(current).__name__)
    try:
        if isinstance(current, bool):
            if value.lower() in _TRUE:
                return True
            if value.lower() in _FALSE:
                return False
            raise ValueError(f"not one of {_TRUE + _FALSE}")
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, tuple):
            kind = "a tuple of integers"
            parts = value.strip("[]").replace(",", ":").split(":")
            return tuple(int(v) for v in parts if v.strip())
    except ValueError as e:
        raise ValueError(f"config override {key}={value!r}: {key} takes {kind} "
                         f"(e.g. {key}={_example(current)}); {e}") from None
    return value


def _example(current) -> str:
    if isinstance(current, tuple):
        return "[" + ",".join(map(str, current or (1, 2))) + "]"
    return str(current).lower() if isinstance(current, bool) else str(current)


def parse_overrides(config: ml_collections.ConfigDict, arg: str | None):
    """Applies ``"key=value,key=value"`` with each value cast to the field's type.

    Tuples take ``a:b:c`` or ``[a,b,c]``; ``loss=[ce,brier]`` lists member losses;
    booleans take true / false (also 1 / 0, yes / no, on / off). A value that does not
    fit its field's type raises a ``ValueError`` naming the field.
    """
    if not arg:
        return config
    for item in split_overrides(arg):
        if "=" not in item:
            raise ValueError(f"config override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        if key not in config:
            raise ValueError(f"unknown config field {key!r}; fields: {sorted(config.keys())}")
        config[key] = _cast(key, config[key], value)
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return parse_overrides(base_config(), arg)
