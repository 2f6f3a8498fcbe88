// Sends one of each Segment call to Tandem with Segment's official Node SDK,
// unchanged but for its host. Exits non-zero if the SDK reports any error.
//
// usage: node send_events.mjs HOST WRITE_KEY TAG
import { Analytics } from '@segment/analytics-node'

const [host, writeKey, tag] = process.argv.slice(2)
const errors = []
const analytics = new Analytics({ writeKey, host, maxRetries: 2, flushInterval: 200 })
analytics.on('error', (error) => errors.push(String(error?.reason ?? error?.message ?? error)))

const userId = `${tag}-user`
const anonymousId = `${tag}-anon`
analytics.identify({ userId, traits: { email: `${tag}@example.com`, plan: 'pro' }, messageId: `${tag}-identify` })
analytics.track({
  userId,
  event: 'Order Completed',
  properties: { revenue: 42.5, currency: 'EUR', items: [{ sku: 'A-1', qty: 2 }] },
  context: { campaign: { source: 'newsletter' } },
  messageId: `${tag}-track`,
})
analytics.page({ anonymousId, category: 'Docs', name: 'Pricing', properties: { url: 'https://shop.example/pricing' }, messageId: `${tag}-page` })
analytics.screen({ userId, name: 'Home', properties: { variant: 'b' }, messageId: `${tag}-screen` })
analytics.group({ userId, groupId: `${tag}-acme`, traits: { employees: 50 }, messageId: `${tag}-group` })
analytics.alias({ previousId: anonymousId, userId, messageId: `${tag}-alias` })
await analytics.closeAndFlush({ timeout: 15000 })
if (errors.length > 0) {
  console.error(`the SDK reported errors: ${errors.join('; ')}`)
  process.exit(1)
}
console.log('sent 6 calls')
