"""WebText's recipe, step one: the outbound links of Reddit submissions with enough karma.

`urls` normalizes URLs and classifies links (Reddit's own, Wikipedia, media hosts); `reddit` turns
Pushshift submission dumps into the deduplicated URL list that tools/reddit_urls.py writes and
tools/curate.py joins crawled pages to (`--url-metadata`).
"""
