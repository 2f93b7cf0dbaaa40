"""imagebot's benchmark (issue 8): the bot's own cost against a bare python-telegram-bot bot."""
