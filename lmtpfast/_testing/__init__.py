"""Real-peer test beds for lmtpfast (Dovecot LMTP, Postfix smtp-sink/smtp-source...) and their
pytest fixtures."""
