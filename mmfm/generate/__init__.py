"""Generation: plain, speculative (Token Recycling, draft model) and masked parallel decoding."""
