// Loads Segment's analytics.js (@segment/analytics-next, its browser bundle
// from npm) in headless Chromium from a page on its own local port, with only
// `writeKey` and `cdnURL` pointing at Tandem, and sends a page, an identify
// and a track call tagged TAG. Exits once Tandem has answered 200 to each.
//
// With --rudderstack, RudderStack's JavaScript SDK (@rudderstack/analytics-js,
// its bundled browser build) instead, loaded with Tandem as both the data
// plane URL and `configUrl`.
//
// With --fail-first, a small proxy stands between the browser and Tandem and
// answers the first tracking request with a 503, so analytics.js retries it
// with an X-Retry-Count header; the script then also waits for that retry to
// be accepted.
//
// usage: node load_in_chromium.mjs TANDEM_URL WRITE_KEY TAG [--fail-first | --rudderstack]
import http from 'node:http'
import { readFile } from 'node:fs/promises'
import { chromium } from 'playwright-core'

const [tandemUrl, writeKey, tag, mode] = process.argv.slice(2)
const failFirst = mode === '--fail-first'
const rudderstack = mode === '--rudderstack'
const bundle = rudderstack
  ? new URL('./node_modules/@rudderstack/analytics-js/dist/npm/modern/bundled/umd/', import.meta.url)
  : new URL('./node_modules/@segment/analytics-next/dist/umd/', import.meta.url)

function listen(server) {
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server.address().port)))
}

// The website: a page and the SDK's bundle, on another origin than Tandem.
const site = http.createServer(async (request, response) => {
  if (request.url === '/') {
    response.writeHead(200, { 'Content-Type': 'text/html' })
    response.end('<!doctype html><title>shop</title><script src="/sdk/index.js"></script>')
    return
  }
  try {
    const body = await readFile(new URL('.' + request.url.replace(/^\/sdk/, '').split('?')[0], bundle))
    response.writeHead(200, { 'Content-Type': 'text/javascript' })
    response.end(body)
  } catch {
    response.writeHead(404)
    response.end()
  }
})
const sitePort = await listen(site)

// Optionally, a proxy that forwards everything to Tandem but refuses the
// first tracking POST, as a restart or an overloaded node would.
let cdnUrl = tandemUrl
let refused = 0
let proxy
if (failFirst) {
  const target = new URL(tandemUrl)
  proxy = http.createServer((request, response) => {
    const tracking = request.method === 'POST' && /^\/v1\/[a-z]/.test(request.url)
    if (tracking && refused === 0) {
      refused += 1
      request.resume()
      response.writeHead(503, {
        'Content-Type': 'application/json',
        'Access-Control-Allow-Origin': request.headers.origin ?? '*',
        'Access-Control-Allow-Credentials': 'true',
      })
      response.end('{"error":{"code":"unavailable","message":"restarting","field":null}}')
      return
    }
    const upstream = http.request(
      { host: target.hostname, port: target.port, path: request.url, method: request.method, headers: request.headers },
      (answer) => {
        response.writeHead(answer.statusCode, answer.headers)
        answer.pipe(response)
      },
    )
    upstream.on('error', () => {
      response.writeHead(502)
      response.end()
    })
    request.pipe(upstream)
  })
  cdnUrl = `http://127.0.0.1:${await listen(proxy)}`
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--no-sandbox'],
})
const problems = []
const accepted = []
const retriesAccepted = []
try {
  const page = await browser.newPage()
  page.on('console', (message) => {
    if (message.type() === 'error') problems.push(`console: ${message.text()}`)
  })
  page.on('requestfailed', (request) => problems.push(`failed: ${request.url()} ${request.failure()?.errorText}`))
  page.on('response', async (response) => {
    const request = response.request()
    if (request.method() !== 'POST' || !/\/v1\/[a-z]+$/.test(new URL(response.url()).pathname)) return
    if (response.status() !== 200) return
    accepted.push(new URL(response.url()).pathname)
    if (request.headers()['x-retry-count']) retriesAccepted.push(request.headers()['x-retry-count'])
  })
  await page.goto(`http://127.0.0.1:${sitePort}/`)
  if (rudderstack) {
    await page.evaluate(
      async ({ writeKey, tandem, tag }) => {
        const analytics = new window.rudderanalytics.RudderAnalytics()
        await new Promise((resolve) => {
          analytics.load(writeKey, tandem, { configUrl: tandem, onLoaded: resolve })
        })
        analytics.page('Docs', `${tag} Pricing`, { plan: 'pro' })
        analytics.identify(`${tag}-user`, { email: `${tag}@example.com`, plan: 'pro' })
        analytics.track(`${tag} Order Completed`, { revenue: 42.5, currency: 'EUR' })
      },
      { writeKey, tandem: cdnUrl, tag },
    )
  } else {
    await page.evaluate(
      async ({ writeKey, cdnURL, tag }) => {
        const [analytics] = await window.AnalyticsNext.AnalyticsBrowser.load({ writeKey, cdnURL })
        await analytics.page('Docs', `${tag} Pricing`, { plan: 'pro' })
        await analytics.identify(`${tag}-user`, { email: `${tag}@example.com`, plan: 'pro' })
        await analytics.track(`${tag} Order Completed`, { revenue: 42.5, currency: 'EUR' })
      },
      { writeKey, cdnURL: cdnUrl, tag },
    )
  }
  const deadline = Date.now() + 30000
  const done = () => accepted.length >= 3 && (!failFirst || retriesAccepted.length >= 1)
  while (!done() && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 100))
  if (!done()) {
    const errors = problems.filter((problem) => !(failFirst && problem.includes('503')))
    console.error(`accepted ${JSON.stringify(accepted)}, retries accepted ${JSON.stringify(retriesAccepted)}`)
    console.error(errors.join('\n'))
    process.exit(1)
  }
  console.log(JSON.stringify({ accepted, retriesAccepted, refused }))
} finally {
  await browser.close()
  site.close()
  proxy?.close()
}
process.exit(0)
