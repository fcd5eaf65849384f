"""bench/_share_globals.py: a tokenizer whose hot data are module globals (bench_share.py).

VOCAB (a dict of 5,000 words) and WORDS (a list of them) are built at import, as a user's
module builds its tables; tokenize() only reads them, so on 3.13t every thread that calls it
writes the reference counts of the dict, the list and each word it touches."""

VOCAB = {("w%d" % i): i for i in range(5000)}
WORDS = list(VOCAB)


def tokenize(lo, hi, work=200):
    """Items lo..hi-1, each `work` lookups; returns a checksum."""
    acc = 0
    for i in range(lo, hi):
        for k in range(work):
            acc = (acc * 31 + VOCAB[WORDS[(i * 7 + k) % 5000]]) & 0xFFFFFFFF
    return acc
