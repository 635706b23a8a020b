"""The worker pool: worker processes (`worker`), their management (`pool`), data movement (`transport`)."""
