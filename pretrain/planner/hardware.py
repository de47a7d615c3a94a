"""The machines a plan is for: accelerators by name, and a cluster of them.

Figures are the vendors' data sheets (dense bf16 tensor-core peak, without sparsity; NVLink
bandwidth per direction, which is what one GPU can send while it receives as much).
"""

from __future__ import annotations

import re

from dataclasses import dataclass


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_gib: float
    bf16_tflops: float
    """Dense bf16 peak, TFLOP/s: what MFU is measured against."""
    fp32_tflops: float
    """fp32 peak without tensor cores (torch leaves TF32 off for matmuls by default), TFLOP/s."""
    intra_node_gbytes: float
    """GB/s one GPU sends to its node's peers (NVLink per direction; PCIe where there is none)."""
    memory_gbytes: float
    """HBM bandwidth, GB/s: bounds the optimizer step, which reads and writes every state once."""


ACCELERATORS = {
    # H100 SXM5 80GB: 989 TFLOP/s bf16 dense, 67 fp32, NVLink 4 900 GB/s bidirectional, HBM3 3.35 TB/s.
    "h100": Accelerator("H100 SXM 80GB", 80.0, 989.0, 67.0, 450.0, 3350.0),
    # H200 SXM 141GB: the H100's compute with HBM3e, 4.8 TB/s.
    "h200": Accelerator("H200 SXM 141GB", 141.0, 989.0, 67.0, 450.0, 4800.0),
    # A100 SXM4 80GB / 40GB: 312 TFLOP/s bf16 dense, 19.5 fp32, NVLink 3 600 GB/s bidirectional.
    "a100": Accelerator("A100 SXM 80GB", 80.0, 312.0, 19.5, 300.0, 2039.0),
    "a100-40gb": Accelerator("A100 SXM 40GB", 40.0, 312.0, 19.5, 300.0, 1555.0),
    # L40S: 362 TFLOP/s bf16 dense, 91.6 fp32, no NVLink: PCIe 4.0 x16, 32 GB/s per direction.
    "l40s": Accelerator("L40S 48GB", 48.0, 362.0, 91.6, 32.0, 864.0),
    # B200: 2.25 PFLOP/s bf16 dense, 75 fp32, NVLink 5 1.8 TB/s bidirectional.
    "b200": Accelerator("B200 180GB", 180.0, 2250.0, 75.0, 900.0, 8000.0),
}


def accelerator(name: str) -> Accelerator:
    try:
        return ACCELERATORS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(ACCELERATORS)}") from None


# Dense bf16 TFLOP/s by the device name torch reports, most specific first, each a whole word ("A100" is not
# "A1000", "H200" not "GH200"): the same chip differs by form factor (data sheets: H100 SXM 989, H100 NVL 835,
# H100 PCIe 756; H200 SXM 989, H200 NVL 835; A100 312 in every form; GH200's Hopper 989; GB200's Blackwell
# 2500). A name matched by none gets no MFU rather than a wrong one.
DEVICE_PEAKS = (
    (r"\bH100 NVL\b", 835.0),
    (r"\bH100 PCIE\b", 756.0),
    (r"\bH100\b", 989.0),  # "NVIDIA H100 80GB HBM3" (SXM5)
    (r"\bH200 NVL\b", 835.0),
    (r"\bH200\b", 989.0),
    (r"\bGH200\b", 989.0),
    (r"\bH800 PCIE\b", 756.0),
    (r"\bH800\b", 989.0),
    (r"\bA100\b", 312.0),
    (r"\bA800\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bGB200\b", 2500.0),
    (r"\bB200\b", 2250.0),
)


def peak_tflops_by_device_name(device_name: str) -> float | None:
    """Dense bf16 peak of a device as torch names it ("NVIDIA H100 80GB HBM3"), for MFU; None if unknown."""
    upper = device_name.upper()
    return next((tflops for pattern, tflops in DEVICE_PEAKS if re.search(pattern, upper)), None)


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu: Accelerator
    inter_node_gbits: float = 400.0
    """Network bandwidth per GPU, Gbit/s per direction (one 400G InfiniBand NDR port per GPU on
    DGX H100-class nodes)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def bandwidth_gbytes(self, group_size: int, spans_nodes: bool) -> float:
        """GB/s per GPU in a collective over `group_size` ranks: NVLink inside a node, the network across."""
        if group_size <= 1:
            return float("inf")
        return self.inter_node_gbits / 8 if spans_nodes else self.gpu.intra_node_gbytes
