"""Billing: pricing, subscriptions, closing, invoices, documents, credit notes, webhooks and the books."""
