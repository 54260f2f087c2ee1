"""Lightning integration: `AdapterCallback`, per-rule optimizer groups, `MergeRestart`, `ForgettingMonitor`,
`AtomicCheckpointIO`. Hooks stay thin; the logic lives in plain functions of `core/`.
"""
