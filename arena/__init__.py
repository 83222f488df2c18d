"""The arena: two anonymous answers, votes, ratings, matchmaking, judges and the feedback loop.

It talks to the server only through the OpenAI API and never imports loraflow.serve."""
