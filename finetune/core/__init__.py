"""The model side of finetune: everything one `Trainer.fit` needs, and nothing of the front ends.

backbone (+ weights, zoo) · strategies/ · trainer (+ state, events, checkpoint) · activation
cache · precision · memory · metrics · config. Imports point down only: core may use
`finetune.data` (for `Preprocessing`), never `finetune.callbacks`, `cli` or `functional`.
See docs/architecture.md.
"""
