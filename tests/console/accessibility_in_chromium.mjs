// Checks every page of Tandem's web console in headless Chromium: the
// sign-in page, then, signed in with an admin token, every page reachable
// from the console's own links, starting from the navigation. Pages are
// told apart by their path with the parts after the section folded (one
// audience stands for all audiences), so pages added later are found and
// checked without naming them here; GET forms (searches) are submitted once
// with their placeholders as values. An address of a missing audience
// checks the error page too.
//
// Each page is checked with axe-core (WCAG 2.x A and AA and axe's best
// practices) at 1280 px and at a 390 px phone width, for its size (the HTML
// as sent, before images) and for sideways scrolling at 390 px, with a
// screenshot of both widths into SHOTS_DIR. Prints one JSON object with what it found; the
// Rust test judges it. Exits non-zero only when the browser run itself fails.
//
// usage: node accessibility_in_chromium.mjs TANDEM_URL ADMIN_TOKEN SHOTS_DIR
import { mkdir, readFile } from 'node:fs/promises'
import { createRequire } from 'node:module'
import { chromium } from 'playwright-core'

const [base, adminToken, shotsDir] = process.argv.slice(2)
await mkdir(shotsDir, { recursive: true })
const require = createRequire(import.meta.url)
const axeSource = await readFile(require.resolve('axe-core/axe.min.js'), 'utf8')
const axeVersion = JSON.parse(await readFile(require.resolve('axe-core/package.json'), 'utf8')).version

const MAX_PAGES = 60
const PHONE = { width: 390, height: 844 }
const DESKTOP = { width: 1280, height: 900 }

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--no-sandbox'],
})
const found = { axe: axeVersion, pages: [], scriptErrors: [] }

// The kind of page an address is: the section and how deep below it, plus
// whether it carries a search. `/console/audiences/vip` → `console/audiences/*`.
function kindOf(url, searched) {
  const parts = url.pathname.split('/').filter(Boolean)
  const kind = parts.slice(0, 2).join('/') + '/*'.repeat(Math.max(0, parts.length - 2))
  return searched ? `${kind}?search` : kind
}

function isConsolePage(url) {
  return (
    url.origin === new URL(base).origin &&
    url.pathname.startsWith('/console') &&
    !url.pathname.startsWith('/console/assets/') &&
    !url.pathname.endsWith('/sign-out')
  )
}

// Links and GET-form addresses on the current page, navigation first.
async function addressesOn(page) {
  return page.evaluate(() => {
    const links = [...document.querySelectorAll('nav a[href]'), ...document.querySelectorAll('main a[href]')].map(
      (link) => ({ href: link.href, searched: false }),
    )
    const forms = [...document.querySelectorAll('main form')]
      .filter((form) => (form.getAttribute('method') ?? 'get').toLowerCase() === 'get')
      .map((form) => {
        // Not `form.action`: a field named `action` (the audit log's filter) shadows it.
        const url = new URL(form.getAttribute('action') ?? '', document.baseURI)
        for (const field of form.querySelectorAll('input[name]')) {
          if (field.type === 'hidden' || field.placeholder) url.searchParams.set(field.name, field.value || field.placeholder)
        }
        return { href: url.href, searched: true }
      })
    return [...links, ...forms]
  })
}

// axe's violations of WCAG 2.x A and AA and its best practices, as the page is now.
async function audit(page) {
  const results = await page.evaluate(() =>
    window.axe.run(document, {
      runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'wcag22aa', 'best-practice'] },
      resultTypes: ['violations'],
    }),
  )
  return results.violations.map((violation) => ({
    id: violation.id,
    impact: violation.impact,
    help: violation.help,
    targets: violation.nodes.slice(0, 5).map((node) => node.target.join(' ')),
  }))
}

async function check(page, url, name) {
  const response = await page.goto(url)
  const body = await response.body()
  await page.evaluate(axeSource)
  const number = String(found.pages.length + 1).padStart(2, '0')
  await page.setViewportSize(DESKTOP)
  const desktop = await audit(page)
  await page.screenshot({ path: `${shotsDir}/${number}-${name}.png`, fullPage: true })
  // At a phone's width the layout changes (tables scroll on their own), so axe looks again.
  await page.setViewportSize(PHONE)
  const phone = await audit(page)
  const scrollWidth = await page.evaluate(() => document.documentElement.scrollWidth)
  await page.screenshot({ path: `${shotsDir}/${number}-${name}-390px.png`, fullPage: true })
  await page.setViewportSize(DESKTOP)
  const violations = [
    ...desktop.map((violation) => ({ ...violation, width: DESKTOP.width })),
    ...phone.map((violation) => ({ ...violation, width: PHONE.width })),
  ]
  const shown = {
    url: new URL(page.url()).pathname + new URL(page.url()).search,
    status: response.status(),
    contentType: response.headers()['content-type'] ?? '',
    bytes: body.length,
    scrollWidth,
    violations,
  }
  found.pages.push(shown)
  return shown
}

try {
  const context = await browser.newContext({ viewport: DESKTOP })
  const page = await context.newPage()
  page.on('pageerror', (error) => found.scriptErrors.push(error.message))

  // The sign-in page, then sign in from the keyboard.
  const signInPage = await check(page, base + '/console/sign-in', 'sign-in')
  signInPage.kind = 'console/sign-in'
  await page.getByLabel('API token').fill(adminToken)
  await Promise.all([page.waitForURL((url) => !url.pathname.endsWith('/sign-in')), page.keyboard.press('Enter')])

  // Every kind of page reachable from the landing page, breadth first.
  const landing = new URL(page.url())
  const queue = [{ url: landing, searched: false }]
  const kinds = new Set(['console/sign-in'])
  kinds.add(kindOf(landing, false))
  while (queue.length > 0 && found.pages.length < MAX_PAGES) {
    const { url, searched } = queue.shift()
    const kind = kindOf(url, searched)
    const shown = await check(page, url.href, kind.replaceAll('/*', '-one').replaceAll(/[^a-z0-9]+/gi, '-'))
    shown.kind = kind
    // A search may redirect to what it found; what is on the page counts.
    for (const next of await addressesOn(page)) {
      const address = new URL(next.href)
      if (!isConsolePage(address)) continue
      const nextKind = kindOf(address, next.searched)
      if (kinds.has(nextKind)) continue
      kinds.add(nextKind)
      queue.push({ url: address, searched: next.searched })
    }
  }
  // The error page, as a missing audience shows it.
  const missing = await check(page, base + '/console/audiences/no%20such%20audience', 'error-page')
  missing.kind = 'error'
  found.signedInAt = landing.pathname
  console.log(JSON.stringify(found))
} catch (error) {
  console.error(error.stack ?? String(error))
  console.error(JSON.stringify(found))
  process.exitCode = 1
} finally {
  await browser.close()
}
