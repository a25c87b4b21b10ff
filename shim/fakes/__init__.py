"""Test doubles for Stripe, Vapi and Twilio, shared by the test suite and the demo."""
