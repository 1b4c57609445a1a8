"""Billing: from usage to money and the documents that record it.

Owns: plans and their versions (`plans`, `catalog`), subscriptions, the pure pricing of a period
(`rating`), typed invoice lines (`lines`), today's preview (`preview`), invoices and their numbers,
closing and settling the books after the fact (`closing`, `settlement`, `credit_notes`), frozen
documents (`documents`, `rendered`) and webhooks with their outbox.
Does not own: usage queries (`metering`), customers (`customers`), decimal text and rounding
(`kernel.money`), nor HTTP (`api`, `web`).
"""
