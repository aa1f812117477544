"""Load tester for any OpenAI-compatible endpoint. Talks to servers over HTTP only."""
