"""Reporting: leaderboard rules, rendering, publishing, pairwise comparisons, statistics, charts."""
