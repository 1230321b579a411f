"""Mesh axis names (a leaf module: losses and models may import it; it imports nothing)."""

MESH_AXES = ("data", "fsdp", "tensor", "expert")
# The batch is split over every axis but `tensor`: outside the MoE layers the `expert` axis is
# one more data-parallel axis (its devices hold different experts, and different rows).
BATCH_AXES = ("data", "fsdp", "expert")
