import numpy as np

__version__: str

divergence_names: tuple[str, ...]

max_cache_classes: int

def build_info() -> dict[str, object]: ...
def reads_in_place(array: np.ndarray) -> bool: ...
def top_k(
    teacher_logits: np.ndarray, k: int, temperature: float, num_threads: int
) -> tuple[np.ndarray, np.ndarray]: ...
def sample_teacher(
    teacher_logits: np.ndarray, num_samples: int, temperature: float, seed: int, num_threads: int
) -> tuple[np.ndarray, np.ndarray]: ...

class DistillationLoss:
    def __init__(
        self,
        temperature: float,
        alpha: float,
        reduction: str,
        ignore_index: int,
        num_threads: int,
        divergence: str,
        beta: float,
        skew: float,
        tail: str,
    ) -> None: ...
    @property
    def temperature(self) -> float: ...
    @property
    def alpha(self) -> float: ...
    @property
    def reduction(self) -> str: ...
    @property
    def ignore_index(self) -> int: ...
    @property
    def num_threads(self) -> int: ...
    @property
    def divergence(self) -> str: ...
    @property
    def beta(self) -> float: ...
    @property
    def skew(self) -> float: ...
    @property
    def tail(self) -> str: ...
    def evaluate(
        self,
        student_logits: np.ndarray,
        teacher_logits: np.ndarray | tuple[np.ndarray, np.ndarray],
        true_labels: np.ndarray | None,
        out: np.ndarray | None,
        want_gradient: bool,
        normalizer: float | None,
    ) -> tuple[float | np.ndarray, np.ndarray | None, int]: ...
    def parts(
        self,
        student_logits: np.ndarray,
        teacher_logits: np.ndarray | tuple[np.ndarray, np.ndarray],
        true_labels: np.ndarray | None,
        normalizer: float | None,
    ) -> tuple[float | np.ndarray, float | np.ndarray]: ...
