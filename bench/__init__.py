"""``make bench``: kubehv's speed and memory, each figure next to its physical floor (issue 6)."""
