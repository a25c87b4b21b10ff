-- api.ingest_webhook with a realistic Stripe `checkout.session.completed` event: the full event
-- envelope and Checkout Session object as Stripe sends it (API version 2024-06-20, pretty-printed,
-- ~3 KB), paid, crediting $20.00 to a random seeded org. Each transaction is a new event, session
-- and PaymentIntent (ids end in 63 random bits), so every one is stored, interpreted and credited.
--
-- The ids and the org are pgbench variables INSIDE the literal: pgbench substitutes :name
-- anywhere in the text in the simple query protocol (run.py passes --protocol=simple), which
-- costs the server nothing. Only :r and :org appear; every other colon is followed by a space or
-- a slash. Org n's uuid is '00000000-0000-4000-8000-' || (100000000000 + n) (bench/harness.py).
\set org 100000000000 + random(1, :orgs)
\set r random(1, 9223372036854775806)
SELECT api.ingest_webhook('stripe', 'evt_1B' || :r, 'checkout.session.completed', $payload$
{
  "id": "evt_1B:r",
  "object": "event",
  "api_version": "2024-06-20",
  "created": 1718000123,
  "data": {
    "object": {
      "id": "cs_test_a1:r",
      "object": "checkout.session",
      "adaptive_pricing": {
        "enabled": false
      },
      "after_expiration": null,
      "allow_promotion_codes": null,
      "amount_subtotal": 2000,
      "amount_total": 2000,
      "automatic_tax": {
        "enabled": false,
        "liability": null,
        "status": null
      },
      "billing_address_collection": null,
      "cancel_url": "https://app.example.test/billing/cancel",
      "client_reference_id": "00000000-0000-4000-8000-:org",
      "client_secret": null,
      "consent": null,
      "consent_collection": null,
      "created": 1718000000,
      "currency": "usd",
      "currency_conversion": null,
      "custom_fields": [],
      "custom_text": {
        "after_submit": null,
        "shipping_address": null,
        "submit": null,
        "terms_of_service_acceptance": null
      },
      "customer": "cus_QbenchCustomer01",
      "customer_creation": "if_required",
      "customer_details": {
        "address": {
          "city": null,
          "country": "US",
          "line1": null,
          "line2": null,
          "postal_code": "94107",
          "state": null
        },
        "email": "billing@example.test",
        "name": "Test Customer",
        "phone": null,
        "tax_exempt": "none",
        "tax_ids": []
      },
      "customer_email": "billing@example.test",
      "expires_at": 1718086400,
      "invoice": null,
      "invoice_creation": {
        "enabled": false,
        "invoice_data": {
          "account_tax_ids": null,
          "custom_fields": null,
          "description": null,
          "footer": null,
          "issuer": null,
          "metadata": {},
          "rendering_options": null
        }
      },
      "livemode": false,
      "locale": null,
      "metadata": {
        "org_id": "00000000-0000-4000-8000-:org"
      },
      "mode": "payment",
      "payment_intent": "pi_3B:r",
      "payment_link": null,
      "payment_method_collection": "if_required",
      "payment_method_configuration_details": null,
      "payment_method_options": {
        "card": {
          "request_three_d_secure": "automatic"
        }
      },
      "payment_method_types": [
        "card"
      ],
      "payment_status": "paid",
      "phone_number_collection": {
        "enabled": false
      },
      "recovered_from": null,
      "saved_payment_method_options": null,
      "setup_intent": null,
      "shipping_address_collection": null,
      "shipping_cost": null,
      "shipping_details": null,
      "shipping_options": [],
      "status": "complete",
      "submit_type": null,
      "subscription": null,
      "success_url": "https://app.example.test/billing/success",
      "total_details": {
        "amount_discount": 0,
        "amount_shipping": 0,
        "amount_tax": 0
      },
      "ui_mode": "hosted",
      "url": null
    }
  },
  "livemode": false,
  "pending_webhooks": 1,
  "request": {
    "id": null,
    "idempotency_key": null
  },
  "type": "checkout.session.completed"
}
$payload$::jsonb);
