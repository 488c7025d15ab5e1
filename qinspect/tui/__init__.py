"""The Textual app: views over the analyses; it never parses bytes itself."""
