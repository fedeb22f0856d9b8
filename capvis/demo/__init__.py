"""The CPU demo: CaptionWorld -> vocabulary -> bicaptioning pretraining -> frozen-feature SVMs,
against the same ConvNet at random init, with a report of tables, curves, captions and attention."""
