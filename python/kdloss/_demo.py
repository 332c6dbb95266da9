"""``python -m kdloss demo``: the experiment of Hinton et al. (2015) in miniature, with NumPy and kdloss alone.

A large teacher network and a small student network learn to read noisy seven-segment digits from only a few
hundred labelled images. The student is trained twice from the same initialisation, on the same images in the
same order: once on the hard labels alone, once with :class:`~kdloss.DistillationLoss` against the teacher's
logits. As in the paper's MNIST experiment, the teacher is regularised (dropout, jittered inputs) and the students
are not; matching the teacher's softened outputs is then the distilled student's only regulariser, and it
generalises better than the student that saw the labels alone.

Everything is generated from the seed; nothing is downloaded. The networks are plain NumPy multi-layer
perceptrons with hand-written backpropagation and Adam; every loss and every loss gradient, including the plain
cross-entropy, comes from :class:`~kdloss.DistillationLoss` (with ``alpha=1`` it is the cross-entropy alone).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import numpy as np

from ._loss import DistillationLoss
from ._sparse_builders import sample_teacher, top_k
from ._sparse_teacher import SparseTeacher

# What a distilled student learns from: the teacher's logits, or a sparse cache of them (rows sliced alike).
Teacher = Union[np.ndarray, SparseTeacher]

__all__ = [
    "CROSS_ENTROPY",
    "HELP",
    "MLP",
    "Adam",
    "Dataset",
    "DemoConfig",
    "DemoResult",
    "History",
    "ModelResult",
    "accuracy",
    "add_arguments",
    "format_table",
    "jitter",
    "loss_and_gradients",
    "make_digits",
    "plot_learning_curves",
    "run",
    "run_experiment",
    "shift_images",
    "train",
]

HELP = "distil a large teacher into a small student on generated digits and compare (takes seconds)"

# ----------------------------------------------------------------------------------------------------------------
# Data: noisy seven-segment digits
# ----------------------------------------------------------------------------------------------------------------

IMAGE_SHAPE = (13, 9)
N_CLASSES = 10
SEGMENT_NAMES = "abcdefg"  # top, upper right, lower right, bottom, lower left, upper left, middle
DIGIT_SEGMENTS = ("abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg", "abcdfg")


def segment_masks() -> np.ndarray:
    """Return the seven segments as binary images.

    Returns
    -------
    numpy.ndarray
        Shape ``(7, 13, 9)``, in the order of ``SEGMENT_NAMES``. The strokes leave a one-pixel margin, so that a
        one-pixel shift never pushes a template off the canvas.
    """
    masks = np.zeros((len(SEGMENT_NAMES), *IMAGE_SHAPE))
    top, middle, bottom, left, right = 1, 6, 11, 1, 7
    masks[0, top, left + 1 : right] = 1  # a
    masks[1, top + 1 : middle, right] = 1  # b
    masks[2, middle + 1 : bottom, right] = 1  # c
    masks[3, bottom, left + 1 : right] = 1  # d
    masks[4, middle + 1 : bottom, left] = 1  # e
    masks[5, top + 1 : middle, left] = 1  # f
    masks[6, middle, left + 1 : right] = 1  # g
    return masks


def _digit_segments() -> np.ndarray:
    """Return the ``(10, 7)`` 0/1 table of which segments each digit lights."""
    return np.array([[name in lit for name in SEGMENT_NAMES] for lit in DIGIT_SEGMENTS], dtype=float)


def shift_images(images: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Shift each image by its own offset in {-1, 0, 1}, filling the uncovered border with zeros.

    Parameters
    ----------
    images : numpy.ndarray
        Shape ``(n, height, width)``.
    dy, dx : numpy.ndarray
        Integer offsets in {-1, 0, 1}, shape ``(n,)``; positive moves the content down / right.

    Returns
    -------
    numpy.ndarray
        The shifted images, a new array of the same shape.
    """
    n, height, width = images.shape
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    # Window (1 - dy, 1 - dx) of the padded image is the image moved by (dy, dx).
    windows = np.lib.stride_tricks.sliding_window_view(padded, (height, width), axis=(1, 2))
    shifted: np.ndarray = windows[np.arange(n), 1 - dy, 1 - dx].copy()
    return shifted


def make_digits(
    n: int,
    rng: np.random.Generator,
    *,
    noise: float = 0.2,
    p_off: float = 0.02,
    p_on: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` noisy seven-segment digit images, the ten classes equally often.

    Each image is its digit's template with every segment at a random brightness in [0.6, 1.2], a lit segment
    failing with probability ``p_off`` and an unlit one lighting with probability ``p_on`` (so a few images are
    genuinely ambiguous: an 8 with a dead segment is a 0, 6 or 9), shifted by up to one pixel each way, plus
    Gaussian pixel noise.

    Parameters
    ----------
    n : int
        Number of images.
    rng : numpy.random.Generator
        Source of all randomness.
    noise : float, default 0.2
        Standard deviation of the pixel noise.
    p_off, p_on : float, default 0.02 and 0.01
        Probabilities of a segment failing or lighting spuriously.

    Returns
    -------
    images : numpy.ndarray
        Shape ``(n, 117)`` float64, the 13 x 9 images flattened.
    labels : numpy.ndarray
        Shape ``(n,)`` int64, the digits.
    """
    labels = rng.permutation(np.arange(n) % N_CLASSES)
    lit = _digit_segments()[labels].astype(bool)
    lit = np.where(lit, rng.random(lit.shape) >= p_off, rng.random(lit.shape) < p_on)
    brightness = rng.uniform(0.6, 1.2, lit.shape) * lit
    images = np.einsum("ns,shw->nhw", brightness, segment_masks())
    images = shift_images(images, rng.integers(-1, 2, n), rng.integers(-1, 2, n))
    images += noise * rng.standard_normal(images.shape)
    return images.reshape(n, -1), labels.astype(np.int64)


def jitter(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shift each flattened image by a random offset of up to one pixel each way (the teacher's augmentation).

    Parameters
    ----------
    images : numpy.ndarray
        Shape ``(n, 117)``, flattened 13 x 9 images.
    rng : numpy.random.Generator
        Source of the offsets.

    Returns
    -------
    numpy.ndarray
        The jittered images, shape ``(n, 117)``.
    """
    n = len(images)
    shifted = shift_images(images.reshape(n, *IMAGE_SHAPE), rng.integers(-1, 2, n), rng.integers(-1, 2, n))
    return shifted.reshape(n, -1)


# ----------------------------------------------------------------------------------------------------------------
# Model: a ReLU multi-layer perceptron with hand-written backpropagation, and Adam
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class MLP:
    """A fully connected network with ReLU hidden layers and linear output logits.

    Attributes
    ----------
    weights : list of numpy.ndarray
        ``weights[k]`` has shape ``(fan_in, fan_out)`` of layer ``k``.
    biases : list of numpy.ndarray
        ``biases[k]`` has shape ``(fan_out,)``.
    """

    weights: list[np.ndarray]
    biases: list[np.ndarray]

    @classmethod
    def initialise(cls, sizes: Sequence[int], rng: np.random.Generator) -> MLP:
        """Create a network with He-initialised weights and zero biases.

        Parameters
        ----------
        sizes : sequence of int
            Layer widths from input to output, e.g. ``(117, 32, 10)``.
        rng : numpy.random.Generator
            Source of the initial weights.
        """
        weights = [rng.standard_normal((a, b)) * math.sqrt(2.0 / a) for a, b in zip(sizes[:-1], sizes[1:])]
        return cls(weights, [np.zeros(b) for b in sizes[1:]])

    @property
    def parameters(self) -> list[np.ndarray]:
        """All weight and bias arrays, in the order :meth:`backward` returns their gradients."""
        return [*self.weights, *self.biases]

    @property
    def n_parameters(self) -> int:
        """The number of trainable scalars."""
        return sum(p.size for p in self.parameters)

    @property
    def hidden(self) -> str:
        """The hidden-layer widths, e.g. ``"256-256"``."""
        return "-".join(str(w.shape[1]) for w in self.weights[:-1])

    def forward(
        self, x: np.ndarray, *, dropout: float = 0.0, rng: Optional[np.random.Generator] = None
    ) -> list[np.ndarray]:
        """Run the network and keep what :meth:`backward` needs.

        Parameters
        ----------
        x : numpy.ndarray
            Inputs, shape ``(batch, n_inputs)``.
        dropout : float, default 0.0
            Probability of zeroing each hidden unit (inverted dropout: survivors are scaled by
            ``1 / (1 - dropout)`` so that evaluation needs no rescaling).
        rng : numpy.random.Generator, optional
            Source of the dropout masks; required when ``dropout > 0``.

        Returns
        -------
        list of numpy.ndarray
            The input, every hidden activation (after ReLU and dropout) and, last, the logits.
        """
        activations = [x]
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = x @ w + b
            if k < len(self.weights) - 1:
                x = np.maximum(x, 0.0)
                if dropout > 0.0:
                    if rng is None:
                        raise ValueError("dropout needs a random generator, rng")
                    x = x * ((rng.random(x.shape) >= dropout) / (1.0 - dropout))
            activations.append(x)
        return activations

    def backward(
        self, activations: list[np.ndarray], grad_logits: np.ndarray, *, dropout: float = 0.0
    ) -> list[np.ndarray]:
        """Backpropagate a gradient with respect to the logits to every parameter.

        Parameters
        ----------
        activations : list of numpy.ndarray
            What :meth:`forward` returned for the same batch.
        grad_logits : numpy.ndarray
            Gradient of the loss with respect to the logits, shape ``(batch, n_outputs)``.
        dropout : float, default 0.0
            The dropout rate :meth:`forward` used.

        Returns
        -------
        list of numpy.ndarray
            Gradients shaped and ordered like :attr:`parameters`.
        """
        n_layers = len(self.weights)
        grad_w: list[np.ndarray] = [np.empty(0)] * n_layers
        grad_b: list[np.ndarray] = [np.empty(0)] * n_layers
        grad = grad_logits
        for k in reversed(range(n_layers)):
            grad_w[k] = activations[k].T @ grad
            grad_b[k] = grad.sum(axis=0)
            if k > 0:
                # A kept unit's activation is ReLU(z) / (1 - dropout) > 0 exactly where z > 0; a dropped or
                # inactive one is 0. So the stored activation gives both the ReLU and the dropout derivative.
                grad = (grad @ self.weights[k].T) * ((activations[k] > 0.0) / (1.0 - dropout))
        return [*grad_w, *grad_b]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Return the output logits for inputs ``x`` in evaluation mode (no dropout)."""
        return self.forward(x)[-1]

    def copy(self) -> MLP:
        """Return an independent copy of the network."""
        return MLP([w.copy() for w in self.weights], [b.copy() for b in self.biases])


class Adam:
    """The Adam optimiser (Kingma and Ba, 2015), updating parameter arrays in place.

    Parameters
    ----------
    parameters : list of numpy.ndarray
        The arrays to optimise; they are modified in place by :meth:`step`.
    learning_rate : float
        Step size.
    """

    def __init__(self, parameters: list[np.ndarray], learning_rate: float) -> None:
        self.parameters = parameters
        self.learning_rate = learning_rate
        self.beta1, self.beta2, self.eps = 0.9, 0.999, 1e-8
        self._m = [np.zeros_like(p) for p in parameters]
        self._v = [np.zeros_like(p) for p in parameters]
        self._t = 0

    def step(self, gradients: list[np.ndarray]) -> None:
        """Apply one update from ``gradients`` (ordered like the parameters)."""
        self._t += 1
        correction1 = 1.0 - self.beta1**self._t
        correction2 = 1.0 - self.beta2**self._t
        for p, g, m, v in zip(self.parameters, gradients, self._m, self._v):
            m *= self.beta1
            m += (1.0 - self.beta1) * g
            v *= self.beta2
            v += (1.0 - self.beta2) * g * g
            p -= self.learning_rate * (m / correction1) / (np.sqrt(v / correction2) + self.eps)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class History:
    """Per-epoch record of a training run.

    Attributes
    ----------
    train_loss : list of float
        Mean of the mini-batch training losses of each epoch.
    test_accuracy : list of float
        Held-out accuracy (fraction correct) after each epoch.
    """

    train_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)


CROSS_ENTROPY = DistillationLoss(temperature=1.0, alpha=1.0)
"""The plain cross-entropy with the hard labels: ``alpha=1`` gives the distillation term zero weight."""

Progress = Callable[[int, History], None]
"""Called after every epoch with the 1-based epoch number and the history so far."""


def accuracy(model: MLP, x: np.ndarray, y: np.ndarray) -> float:
    """Return the fraction of ``x`` that ``model`` classifies as ``y``."""
    return float(np.mean(model.logits(x).argmax(axis=1) == y))


def loss_and_gradients(
    model: MLP,
    x: np.ndarray,
    y: np.ndarray,
    loss: DistillationLoss,
    teacher_logits: Optional[Teacher] = None,
    *,
    dropout: float = 0.0,
    rng: Optional[np.random.Generator] = None,
) -> tuple[float, list[np.ndarray]]:
    """Evaluate ``loss`` on one batch and its gradient with respect to every parameter of ``model``.

    Parameters
    ----------
    model : MLP
        The network being trained.
    x : numpy.ndarray
        Inputs, shape ``(batch, n_inputs)``.
    y : numpy.ndarray
        Class labels, shape ``(batch,)``.
    loss : DistillationLoss
        The objective; its reduction must be "mean" (the gradient is then that of the batch mean).
    teacher_logits : numpy.ndarray or SparseTeacher, optional
        The teacher's logits for ``x``, or a sparse cache of them. Without them ``loss.alpha`` must be 1
        (cross-entropy alone); the model's own logits then fill the teacher's place, where they have zero weight.
    dropout : float, default 0.0
        Hidden-unit dropout rate for this forward pass.
    rng : numpy.random.Generator, optional
        Source of the dropout masks.

    Returns
    -------
    loss_value : float
        The batch loss.
    gradients : list of numpy.ndarray
        Its gradient, ordered like ``model.parameters``.
    """
    activations = model.forward(x, dropout=dropout, rng=rng)
    logits = activations[-1]
    teacher = logits if teacher_logits is None else teacher_logits
    value, grad_logits = loss.loss_and_gradient(logits, teacher, y)
    return float(value), model.backward(activations, grad_logits, dropout=dropout)


def train(
    model: MLP,
    x: np.ndarray,
    y: np.ndarray,
    loss: DistillationLoss,
    *,
    x_test: np.ndarray,
    y_test: np.ndarray,
    rng: np.random.Generator,
    epochs: int,
    teacher_logits: Optional[Teacher] = None,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    dropout: float = 0.0,
    augment: bool = False,
    progress: Optional[Progress] = None,
) -> History:
    """Train ``model`` in place with mini-batch Adam on ``loss``.

    Parameters
    ----------
    model : MLP
        The network; its parameters are updated in place.
    x, y : numpy.ndarray
        Training inputs ``(n, n_inputs)`` and labels ``(n,)``.
    loss : DistillationLoss
        The objective, with reduction "mean". Use ``alpha=1`` (and no teacher) for plain cross-entropy.
    x_test, y_test : numpy.ndarray
        Held-out data, for the accuracy recorded after every epoch.
    rng : numpy.random.Generator
        Source of the batch order, dropout masks and jitter.
    epochs : int
        Number of passes over the training set.
    teacher_logits : numpy.ndarray or SparseTeacher, optional
        The teacher's logits for every training input, shape ``(n, n_classes)``, or a sparse cache of them (``(n,
        K)``), fixed during training.
    batch_size : int, default 64
        Mini-batch size.
    learning_rate : float, default 3e-3
        Adam step size.
    dropout : float, default 0.0
        Hidden-unit dropout rate during training.
    augment : bool, default False
        Jitter every training image by up to one pixel each time it is used. Only for a model trained
        without ``teacher_logits``: a teacher's logits are those of the unjittered images.
    progress : callable, optional
        Called as ``progress(epoch, history)`` after every epoch.

    Returns
    -------
    History
        Mean training loss and held-out accuracy per epoch.
    """
    if teacher_logits is None and loss.alpha != 1.0:
        raise ValueError(f"without teacher logits the loss must have alpha=1, got alpha={loss.alpha}")
    if teacher_logits is not None and augment:
        raise ValueError("augment=True would pair jittered images with the teacher's logits of unjittered ones")
    optimiser = Adam(model.parameters, learning_rate)
    history = History()
    for epoch in range(1, epochs + 1):
        batch_losses = []
        for batch in np.array_split(rng.permutation(len(x)), math.ceil(len(x) / batch_size)):
            xb = jitter(x[batch], rng) if augment else x[batch]
            tb = None if teacher_logits is None else teacher_logits[batch]
            value, gradients = loss_and_gradients(model, xb, y[batch], loss, tb, dropout=dropout, rng=rng)
            optimiser.step(gradients)
            batch_losses.append(value)
        history.train_loss.append(float(np.mean(batch_losses)))
        history.test_accuracy.append(accuracy(model, x_test, y_test))
        if progress is not None:
            progress(epoch, history)
    return history


# ----------------------------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoConfig:
    """Everything that determines a demo run; the defaults are those of ``python -m kdloss demo``.

    The training set is deliberately small and the student deliberately unregularised: that is the regime in
    which a teacher's soft targets carry the most information the hard labels do not.
    """

    seed: int = 0
    epochs: int = 60
    temperature: float = 3.0
    alpha: float = 0.3
    n_train: int = 500
    n_test: int = 4000
    teacher_hidden: tuple[int, ...] = (256, 256)
    student_hidden: tuple[int, ...] = (32,)
    teacher_dropout: float = 0.3
    batch_size: int = 64
    learning_rate: float = 3e-3
    # The distilled student's teacher: None, its logits; ("top-k", K) or ("sample", N), a sparse cache of them
    # (kdloss.top_k, kdloss.sample_teacher) that the student is distilled from instead.
    teacher_cache: Optional[tuple[str, int]] = None


@dataclass
class ModelResult:
    """Final figures of one trained model.

    Attributes
    ----------
    name : str
        Row label in the table.
    hidden : str
        Hidden-layer widths.
    n_parameters : int
        Number of trainable scalars.
    train_loss : float
        The model's own training objective on the whole (unjittered) training set at the end.
    train_cross_entropy : float
        Cross-entropy with the hard labels on the training set.
    test_cross_entropy : float
        Cross-entropy with the hard labels on the held-out set.
    test_accuracy : float
        Fraction of the held-out set classified correctly.
    history : History
        The per-epoch record.
    """

    name: str
    hidden: str
    n_parameters: int
    train_loss: float
    train_cross_entropy: float
    test_cross_entropy: float
    test_accuracy: float
    history: History


@dataclass
class DemoResult:
    """The outcome of :func:`run_experiment`: the configuration and the teacher and both students."""

    config: DemoConfig
    teacher: ModelResult
    plain: ModelResult
    distilled: ModelResult
    seconds: float


class Dataset(NamedTuple):
    """Training and held-out images (flattened) and labels."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _fit(
    model: MLP,
    loss: DistillationLoss,
    data: Dataset,
    config: DemoConfig,
    rng: np.random.Generator,
    progress: Progress,
    **options: Any,
) -> History:
    """Call :func:`train` with the data and the schedule of ``config``; ``options`` are passed on."""
    return train(
        model, data.x, data.y, loss, x_test=data.x_test, y_test=data.y_test, rng=rng, epochs=config.epochs,
        batch_size=config.batch_size, learning_rate=config.learning_rate, progress=progress, **options,
    )  # fmt: skip


def _summarise(
    name: str,
    model: MLP,
    history: History,
    loss: DistillationLoss,
    data: Dataset,
    teacher_logits: Optional[Teacher] = None,
) -> ModelResult:
    """Evaluate a trained model on the whole training and held-out sets."""
    logits, test_logits = model.logits(data.x), model.logits(data.x_test)
    # With alpha=1 the teacher argument has zero weight; the model's own logits fill it.
    teacher = logits if teacher_logits is None else teacher_logits
    return ModelResult(
        name=name,
        hidden=model.hidden,
        n_parameters=model.n_parameters,
        train_loss=float(loss.compute_loss(logits, teacher, data.y)),
        train_cross_entropy=float(CROSS_ENTROPY.compute_loss(logits, logits, data.y)),
        test_cross_entropy=float(CROSS_ENTROPY.compute_loss(test_logits, test_logits, data.y_test)),
        test_accuracy=accuracy(model, data.x_test, data.y_test),
        history=history,
    )


def _epoch_reporter(epochs: int, say: Callable[[str], None]) -> Progress:
    """Return a :data:`Progress` callback that prints about six lines per training run."""
    every = max(1, round(epochs / 6))
    width = len(str(epochs))

    def report(epoch: int, history: History) -> None:
        if epoch % every == 0 or epoch == epochs:
            say(
                f"  epoch {epoch:>{width}}/{epochs}   train loss {history.train_loss[-1]:.4f}   "
                f"held-out accuracy {100 * history.test_accuracy[-1]:5.1f} %"
            )

    return report


def run_experiment(config: DemoConfig = DemoConfig(), progress: Optional[Callable[[str], None]] = None) -> DemoResult:
    """Train the teacher, then the student on hard labels and, from the same start, with distillation.

    Parameters
    ----------
    config : DemoConfig
        Sizes, seed and hyper-parameters.
    progress : callable, optional
        Called with one line of text at the start of each phase and every few epochs.

    Returns
    -------
    DemoResult
        The three models' final figures and learning curves.
    """
    say = progress if progress is not None else (lambda line: None)
    report = _epoch_reporter(config.epochs, say)
    start = time.perf_counter()
    # Independent streams, so that e.g. the teacher's training does not change the students' data or order.
    train_seed, test_seed, teacher_seed, student_seed, order_seed = np.random.SeedSequence(config.seed).spawn(5)
    data = Dataset(
        *make_digits(config.n_train, np.random.default_rng(train_seed)),
        *make_digits(config.n_test, np.random.default_rng(test_seed)),
    )
    n_inputs = data.x.shape[1]

    teacher_rng = np.random.default_rng(teacher_seed)
    teacher = MLP.initialise((n_inputs, *config.teacher_hidden, N_CLASSES), teacher_rng)
    say(
        f"teacher: MLP {n_inputs}-{teacher.hidden}-{N_CLASSES} ({teacher.n_parameters:,} parameters), "
        f"dropout {config.teacher_dropout:g}, inputs jittered by up to one pixel"
    )
    teacher_history = _fit(
        teacher, CROSS_ENTROPY, data, config, teacher_rng, report, dropout=config.teacher_dropout, augment=True
    )
    teacher_logits = teacher.logits(data.x)
    teacher_signal: Teacher = teacher_logits
    described = "the teacher's logits"
    if config.teacher_cache is not None:
        teacher_signal, described = _cache_teacher(teacher_logits, config)
        say(f"teacher cached as {described}")

    initial = MLP.initialise((n_inputs, *config.student_hidden, N_CLASSES), np.random.default_rng(student_seed))
    plain, distilled = initial.copy(), initial.copy()
    say(f"student on hard labels: MLP {n_inputs}-{plain.hidden}-{N_CLASSES} ({plain.n_parameters:,} parameters)")
    # Both students get a generator from the same seed: the same batches in the same order. Only the loss differs.
    plain_history = _fit(plain, CROSS_ENTROPY, data, config, np.random.default_rng(order_seed), report)
    kd = DistillationLoss(temperature=config.temperature, alpha=config.alpha)
    say(
        f"same student, same start, with DistillationLoss(temperature={kd.temperature:g}, alpha={kd.alpha:g}) "
        f"against {described.split(':')[0]}"
    )
    distilled_history = _fit(
        distilled, kd, data, config, np.random.default_rng(order_seed), report, teacher_logits=teacher_signal
    )

    return DemoResult(
        config=config,
        teacher=_summarise("teacher", teacher, teacher_history, CROSS_ENTROPY, data),
        plain=_summarise("student, hard labels", plain, plain_history, CROSS_ENTROPY, data),
        distilled=_summarise("student, distilled", distilled, distilled_history, kd, data, teacher_signal),
        seconds=time.perf_counter() - start,
    )


def parse_teacher_cache(text: str) -> tuple[str, int]:
    """``top-k:K`` or ``sample:N`` (K, N >= 1) as ``("top-k", K)`` or ``("sample", N)``; ValueError otherwise."""
    kind, _, number = text.partition(":")
    if kind not in ("top-k", "sample") or not number.isdigit() or int(number) < 1:
        raise ValueError(f"expected top-k:K or sample:N with K, N >= 1, got {text!r}")
    return kind, int(number)


def _cache_teacher(teacher_logits: np.ndarray, config: DemoConfig) -> tuple[SparseTeacher, str]:
    """The teacher's logits cached sparsely at the distillation temperature (int32 indices, float16
    log-probabilities), and a line that says how and what it saves against storing the logits as float32."""
    kind, number = config.teacher_cache
    if kind == "top-k":
        cache = top_k(teacher_logits, min(number, N_CLASSES), temperature=config.temperature)
        how = f"its top {cache.k} classes a row"
    else:
        cache = sample_teacher(teacher_logits, number, temperature=config.temperature, seed=config.seed)
        how = f"{number} draws a row from its softmax ({cache.k} slots)"
    # Stored as a cache on disk would be: log-probabilities in half precision (the loss reads them as they are).
    cache = SparseTeacher(
        cache.indices,
        cache.logprobs.astype(np.float16),
        temperature=cache.temperature,
        vocab_size=cache.vocab_size,
        method=cache.method,
    )
    dense_bytes = teacher_logits.size * 4
    return cache, (
        f"a sparse cache: {how}, {cache.nbytes:,} bytes against {dense_bytes:,} for its logits in float32 "
        f"({cache.nbytes / dense_bytes:.0%})"
    )


def format_table(result: DemoResult) -> str:
    """Render the comparison table and a one-line verdict.

    Parameters
    ----------
    result : DemoResult
        What :func:`run_experiment` returned.

    Returns
    -------
    str
        Several lines, without a trailing newline.
    """
    c = result.config
    header = (
        f"{'model':<22}{'hidden':>8}{'params':>9}{'train loss':>12}{'train CE':>10}"
        f"{'held-out CE':>13}{'held-out acc':>14}"
    )
    lines = [
        f"seed {c.seed}: {c.n_train} training and {c.n_test} held-out images, {c.epochs} epochs, "
        f"temperature {c.temperature:g}, alpha {c.alpha:g}"
        + ("" if c.teacher_cache is None else f", teacher cached as {c.teacher_cache[0]}:{c.teacher_cache[1]}"),
        "",
        header,
        "-" * len(header),
    ]
    for m in (result.teacher, result.plain, result.distilled):
        lines.append(
            f"{m.name:<22}{m.hidden:>8}{m.n_parameters:>9,}{m.train_loss:>12.4f}{m.train_cross_entropy:>10.4f}"
            f"{m.test_cross_entropy:>13.4f}{100 * m.test_accuracy:>12.1f} %"
        )
    lines.append("")
    lines.append("train loss: each model's own objective on the training set: the cross-entropy (CE) with the labels,")
    lines.append("and for the distilled student alpha*CE + (1-alpha)*T^2*KL(teacher || student) at temperature T.")
    teacher, plain, distilled = (m.test_accuracy for m in (result.teacher, result.plain, result.distilled))
    verdict = f"distillation: {100 * (distilled - plain):+.1f} points of held-out accuracy for the student"
    if distilled > plain and teacher > plain:
        verdict += f" ({100 * (distilled - plain) / (teacher - plain):.0f} % of its gap to the teacher closed)"
    lines.append(verdict)
    return "\n".join(lines)


def plot_learning_curves(result: DemoResult, path: Path) -> bool:
    """Write a PNG of both students' held-out accuracy per epoch, with the teacher's final accuracy.

    Parameters
    ----------
    result : DemoResult
        What :func:`run_experiment` returned.
    path : pathlib.Path
        Where to write the PNG.

    Returns
    -------
    bool
        False, writing nothing, if matplotlib is not installed.
    """
    try:
        # The object-oriented API needs no GUI backend and leaves pyplot's global state alone.
        from matplotlib.figure import Figure
    except ImportError:
        return False
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    epochs = np.arange(1, result.config.epochs + 1)
    for model, colour in ((result.plain, "tab:blue"), (result.distilled, "tab:orange")):
        axes.plot(epochs, 100 * np.asarray(model.history.test_accuracy), color=colour, label=model.name)
    axes.axhline(100 * result.teacher.test_accuracy, color="0.4", linestyle="--", label="teacher (final)")
    axes.set_xlabel("epoch")
    axes.set_ylabel("held-out accuracy (%)")
    c = result.config
    axes.set_title(f"kdloss demo: seed {c.seed}, temperature {c.temperature:g}, alpha {c.alpha:g}")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.savefig(path, dpi=120)
    return True


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _integer_at_least(minimum: int, expected: str) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`, described as `expected` in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _integer_at_least(1, "a positive integer")
_seed = _integer_at_least(0, "a non-negative integer")


def _float(text: str) -> float:
    """Parse a finite float for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _temperature(text: str) -> float:
    """Parse a temperature for argparse, checked as DistillationLoss checks it."""
    value = _float(text)
    try:
        DistillationLoss(temperature=value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def _alpha(text: str) -> float:
    """Parse an alpha in [0, 1] for argparse."""
    value = _float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def _teacher_cache(text: str) -> tuple[str, int]:
    """Parse --teacher-cache for argparse."""
    try:
        return parse_teacher_cache(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _png_path(text: str) -> Path:
    """Parse an output path whose directory exists, so that a typo fails before the training, not after."""
    path = Path(text)
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"directory {str(path.parent)!r} does not exist")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to its sub-parser.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The ``demo`` sub-parser.
    """
    defaults = DemoConfig()
    parser.description = (
        "Hinton et al. (2015) in miniature: train a large teacher MLP on a few hundred generated seven-segment "
        "digits, then train one small student MLP twice from the same initialisation, on the hard labels alone "
        "and with DistillationLoss against the teacher's logits, and compare held-out accuracy. NumPy and "
        "kdloss only; nothing is downloaded."
    )
    parser.add_argument("--seed", type=_seed, default=defaults.seed,
                        help="seed of the data and the networks (default %(default)s)")  # fmt: skip
    parser.add_argument("--temperature", type=_temperature, default=defaults.temperature, metavar="T",
                        help="distillation temperature, > 0 (default %(default)s)")  # fmt: skip
    parser.add_argument("--alpha", type=_alpha, default=defaults.alpha,
                        help="weight of the hard-label term, in [0, 1] (default %(default)s)")  # fmt: skip
    parser.add_argument("--epochs", type=_positive_int, default=defaults.epochs, metavar="N",
                        help="training epochs of each network (default %(default)s)")  # fmt: skip
    parser.add_argument("--teacher-cache", type=_teacher_cache, metavar="top-k:K|sample:N",
                        help="distil from a sparse cache of the teacher's outputs instead of its logits: its top "
                        "K classes a row (kdloss.top_k), or N draws a row from its softmax "
                        "(kdloss.sample_teacher)")  # fmt: skip
    parser.add_argument("--plot", type=_png_path, metavar="FILE",
                        help="also write the learning curves to this PNG (needs matplotlib: "
                        "pip install kdloss[plot])")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run the demo with parsed arguments, printing progress and the table.

    Parameters
    ----------
    args : argparse.Namespace
        As parsed with :func:`add_arguments`.

    Returns
    -------
    int
        The exit status, 0.
    """
    config = DemoConfig(
        seed=args.seed,
        epochs=args.epochs,
        temperature=args.temperature,
        alpha=args.alpha,
        teacher_cache=args.teacher_cache,
    )

    def say(line: str) -> None:
        print(line, flush=True)  # flushed, so that progress shows when stdout is a pipe

    result = run_experiment(config, say)
    print()
    print(format_table(result))
    print(f"\n{result.seconds:.1f} s in all", flush=True)
    if args.plot is not None:
        if plot_learning_curves(result, args.plot):
            print(f"learning curves written to {args.plot}")
        else:
            print("no plot written: --plot needs matplotlib (pip install kdloss[plot])", file=sys.stderr)
    return 0
