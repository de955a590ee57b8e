"""The reference's SST binary recipe (``nlp`` branch, ``treeLSTM``, ``sst_train.py``).

Constituency Tree-LSTM (300-d embeddings, memory 150), Adagrad lr 0.05, weight
decay 1e-4, batch 25, 25 epochs, FLSD threshold 0.19, FLSc-531 switching at epochs 3
and 7; the reference keeps the best-dev model, so ``eval_checkpoint="best"``: the
evaluation pass (and the sweep's tables) report it.

As the reference trains (``phrase_labels=True``): the head has three outputs
(negative, neutral, positive) and the loss goes on **every labelled node** of a tree,
each phrase's sentiment mapped to those classes (``datasets.SST_PHRASE_CLASSES``); a
batch's loss is the sum over its trees' nodes divided by the 25 trees. The training
sentences are those with a non-neutral root (6,920). MMCE is the reference's SST form:
``N * (mean CE + MMCE_w)`` over the batch's N labelled nodes, divided by the 25 trees,
so ``mmce_lambda = 1`` (its ``Losses/mmce_sst.py`` takes no lambda).
``phrase_labels=False`` trains on the sentence (root) label with a two-output head.

A sentence is read as negative or positive: the root's negative and positive logits
(``root_classes``), through a softmax over those two, feed accuracy, every calibration
metric, the temperature search and best-dev selection. Predictions, so accuracy and
error, are the reference's (its argmax skips the neutral entry); its confidences are
not: the reference reads the three-class softmax with the neutral entry masked and not
renormalised (``trainer.py``), so its confidence is ``p_pred`` of three classes, lower
than ours, ``p_pred / (p_neg + p_pos)``, by the neutral mass; its NLL and temperature
search are three-class too. Ours are a proper binary classifier's (probabilities that
sum to one over the task's classes); ECE and NLL are not comparable one-to-one.

Other differences: the reference feeds GloVe 840B-300d vectors (not available here:
random trainable embeddings by default; ``embeddings_path`` takes a .npy) and trains
the embeddings with lr 0.1 (one lr here). As the reference's, the vocabulary holds the
words of all three splits (``datasets.load("sst", ..., vocabulary="train")`` for the
training sentences' alone).
A batch of 25 needs a device count that divides it (1 or 5 devices).
Usage: ``--config experiments/configs/sst.py:loss=flsd53``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import cifar10  # noqa: E402


def get_config(arg=None):
    c = cifar10.base_config()
    c.dataset = "sst"
    c.model = "tree_lstm"
    c.optimizer = "adagrad"
    c.learning_rate = 0.05
    c.lr_boundaries = ()
    c.weight_decay = 1e-4
    c.clip_norm = 0.0
    c.momentum = 0.0
    c.num_epochs = 25
    c.batch_size = 25
    c.eval_batch_size = 250
    c.augment = False
    c.loss_mean = True
    c.flsd_threshold = 0.19
    c.gamma_boundaries = (3, 7)
    c.eval_checkpoint = "best"  # the reference keeps the best-dev model
    c.embed_dim = 300
    c.mem_dim = 150  # sst_train.py: 150 for --model_name constituency (168 is dependency's)
    c.phrase_labels = True  # the loss on every labelled phrase, a 3-class head (treeLSTM/)
    c.mmce_lambda = 1.0  # Losses/mmce_sst.py: CE + MMCE_w, no lambda
    c.checkpoint_every_epochs = 5
    return cifar10.parse_overrides(c, arg)
