"""The command-line tools: ``cli`` wires the subcommands (``verify``, ``derive``, ``audit``,
``audit-loss``, ``figures``, ``bench``), each a module here with ``add_arguments`` and ``run``.
``figure_data`` holds the figures' data, computed without matplotlib."""
