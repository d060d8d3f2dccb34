"""The prompt router: APTP's prompt-to-architecture routing, training-free, over pipeline variants built in the graph.

``routing`` holds the maths (similarities, budgeted Sinkhorn, repair, prototypes, router files); ``nodes`` the thin
node classes. Design note: ``router.md``.
"""
