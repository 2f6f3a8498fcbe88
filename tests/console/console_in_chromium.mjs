// Drives Tandem's web console in headless Chromium as people use it, from the
// keyboard where a form allows: an admin signs in and lands on the goals
// page (each goal's value, target, status and trend chart are read), searches a customer by
// e-mail, opens the 360° view, types an audience rule (first one that does
// not parse, to see the error in place, then one that does, to see its size)
// and saves it; a marketer then signs in and sees the members' e-mails
// masked, cannot reach the governance pages and sees a failing destination's
// dead letters masked; an admin opens the stack, that destination's dead
// letters, starts the receiver and replays one (it must leave the list and
// arrive). Saves a screenshot per step into SHOTS_DIR and prints one JSON
// object with what it saw; exits non-zero when a step fails.
//
// usage: DEAD_LETTER_DESTINATION=NAME RECEIVER_PORT=PORT \
//   node console_in_chromium.mjs TANDEM_URL ADMIN_TOKEN MARKETER_TOKEN EMAIL SHOTS_DIR
// (the destination's webhook points at 127.0.0.1:PORT, where nothing listens
// until this script does)
import { mkdir } from 'node:fs/promises'
import http from 'node:http'
import { chromium } from 'playwright-core'

const [base, adminToken, marketerToken, email, shotsDir] = process.argv.slice(2)
await mkdir(shotsDir, { recursive: true })

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--no-sandbox'],
})
const seen = { pages: {}, steps: [] }
let step = 0

function check(condition, message) {
  if (!condition) throw new Error(message)
}

async function shot(page, name) {
  step += 1
  const file = `${shotsDir}/${String(step).padStart(2, '0')}-${name}.png`
  await page.screenshot({ path: file, fullPage: true })
  seen.steps.push(name)
}

// Records each console page's size, to check it stays well under 100 KB.
function measure(page) {
  page.on('response', async (response) => {
    const url = new URL(response.url())
    if (!url.pathname.startsWith('/console') || response.request().method() !== 'GET') return
    try {
      const body = await response.body()
      seen.pages[url.pathname] = Math.max(seen.pages[url.pathname] ?? 0, body.length)
    } catch {
      // A redirect has no body.
    }
  })
}

// Shows the page at a phone's width (a screenshot), then wide again; how far
// it scrolls sideways there (0 when it fits).
async function atPhoneWidth(page, name) {
  await page.setViewportSize({ width: 390, height: 844 })
  await shot(page, name)
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth)
  await page.setViewportSize({ width: 1280, height: 900 })
  return overflow
}

async function signIn(page, token) {
  await page.goto(base + '/')
  check(new URL(page.url()).pathname === '/console/sign-in', `/ led to ${page.url()}`)
  await page.getByLabel('API token').fill(token)
  await Promise.all([page.waitForURL((url) => !url.pathname.endsWith('/sign-in')), page.keyboard.press('Enter')])
}

try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } })
  const page = await context.newPage()
  measure(page)
  const failures = []
  page.on('pageerror', (error) => failures.push(error.message))

  // 1. Sign in as admin: the goals are the landing page.
  await page.goto(base + '/')
  await shot(page, 'sign-in')
  await signIn(page, adminToken)
  check(new URL(page.url()).pathname === '/console/goals', `signed in to ${page.url()}`)
  const cookies = await context.cookies()
  const session = cookies.find((cookie) => cookie.name === 'tandem_session')
  check(session && session.httpOnly && session.sameSite === 'Strict', `session cookie ${JSON.stringify(session)}`)
  seen.cookie = { httpOnly: session.httpOnly, sameSite: session.sameSite, path: session.path }
  await shot(page, 'goals')
  seen.goalsSummary = await page.locator('#goals-summary').innerText()
  seen.goals = await page.locator('li.goal').evaluateAll((cards) =>
    cards.map((card) => ({
      name: card.dataset.goal,
      status: card.dataset.status,
      value: card.dataset.value === '' ? null : Number(card.dataset.value),
      shown: card.querySelector('.value').textContent,
      target: card.querySelector('.of').textContent,
      standsOut: card.classList.contains('bad'),
      chartPoints: (card.querySelector('svg.trend polyline.value')?.getAttribute('points') ?? '').split(' ').filter(Boolean).length,
      chartTitle: card.querySelector('svg.trend title')?.textContent ?? '',
      progress: Number(card.querySelector('progress').getAttribute('value')),
    })),
  )
  check(seen.goals.length > 0, 'no goals on the landing page')
  seen.goalsPhoneOverflow = await atPhoneWidth(page, 'goals-phone')

  // 2. Search a customer by e-mail; the exact identifier opens the 360° view.
  await page.getByRole('link', { name: 'Customers' }).click()
  await page.waitForURL(/\/console\/customers$/)
  await page.getByLabel('Identifier').fill('email:' + email)
  await Promise.all([page.waitForURL(/\/console\/customers\/prof_/), page.getByLabel('Identifier').press('Enter')])
  await shot(page, 'customer-360')
  const identities = await page.locator('#identifier-list').innerText()
  check(identities.includes('email:' + email), `identities: ${identities}`)
  seen.customer = {
    url: new URL(page.url()).pathname,
    identities: identities.split('\n').filter(Boolean),
    timelineRows: await page.locator('section[aria-labelledby="timeline"] tbody tr').count(),
    audiences: await page.locator('section[aria-labelledby="audiences"] tbody tr').count(),
  }
  check(seen.customer.timelineRows > 0, 'the timeline is empty')
  const older = page.getByRole('link', { name: 'Older events' })
  if (await older.count()) {
    await older.click()
    await page.waitForURL(/before=/)
    seen.customer.olderPage = await page.locator('section[aria-labelledby="timeline"] tbody tr').count()
    await shot(page, 'customer-timeline-older')
  }
  // The same view at a phone's width.
  seen.phoneOverflow = await atPhoneWidth(page, 'customer-360-phone')

  // 3. Build an audience from the text syntax.
  await page.getByRole('link', { name: 'Audiences' }).click()
  await page.waitForURL(/\/console\/audiences$/)
  const rule = page.getByLabel('Rule')
  await page.getByLabel('Name').fill('console loyal')
  await rule.fill('count(event "Order Completed", within 90d) >> 1')
  const preview = page.locator('#rule-preview')
  await preview.filter({ hasText: /line 1, column \d+/ }).waitFor({ timeout: 10000 })
  seen.parseError = await preview.innerText()
  await shot(page, 'builder-parse-error')
  await rule.fill('count(event "Order Completed", within 90d) >= 2')
  await preview.filter({ hasText: /profiles? match(es)? now/ }).waitFor({ timeout: 10000 })
  seen.previewText = await preview.innerText()
  seen.previewSize = Number(await preview.getAttribute('data-size'))
  await shot(page, 'builder-preview')
  await Promise.all([page.waitForURL(/\/console\/audiences\/console%20loyal/), page.getByRole('button', { name: 'Save audience' }).click()])
  // The stage backfills it; reload until it has.
  for (let attempt = 0; attempt < 100; attempt += 1) {
    const size = await page.locator('#audience-size').innerText()
    if (!size.includes('backfilling')) break
    await page.waitForTimeout(200)
    await page.reload()
  }
  seen.savedSize = Number((await page.locator('#audience-size').innerText()).trim())
  seen.adminMembers = await page.locator('#member-list tbody tr').allInnerTexts()
  await shot(page, 'audience-saved')

  // 4. Sign out; a marketer sees the members' e-mails masked and no customers page.
  await page.getByRole('button', { name: 'Sign out' }).click()
  await page.waitForURL(/\/console\/sign-in/)
  await signIn(page, marketerToken)
  check(new URL(page.url()).pathname === '/console/goals', `marketer landed on ${page.url()}`)
  seen.marketerNav = await page.locator('nav').innerText()
  await page.getByRole('link', { name: 'Audiences' }).click()
  await page.waitForURL(/\/console\/audiences$/)
  await page.getByRole('link', { name: 'console loyal' }).click()
  await page.waitForURL(/\/console\/audiences\/console%20loyal/)
  seen.marketerMembers = await page.locator('#member-list tbody tr').allInnerTexts()
  await shot(page, 'marketer-masked')
  const refused = await page.goto(base + '/console/customers')
  seen.marketerCustomersStatus = refused.status()
  seen.marketerCustomersText = await page.locator('main').innerText()
  await shot(page, 'marketer-refused')

  // 5. The marketer reaches no governance page, and sees the failing
  //    destination's dead letters with e-mails masked.
  const destination = process.env.DEAD_LETTER_DESTINATION
  const receiverPort = Number(process.env.RECEIVER_PORT)
  check(destination && receiverPort, 'DEAD_LETTER_DESTINATION and RECEIVER_PORT are required')
  const governance = await page.goto(base + '/console/governance')
  seen.marketerGovernance = { status: governance.status(), text: await page.locator('main').innerText() }
  await shot(page, 'marketer-governance-refused')
  seen.marketerGovernance.auditStatus = (await page.goto(base + '/console/governance/audit')).status()
  await page.goto(base + '/console/stack/destinations/' + encodeURIComponent(destination))
  seen.marketerDeadLetters = await page.locator('#dead-letter-list tbody tr').allInnerTexts()
  await shot(page, 'marketer-dead-letters-masked')

  // 6. An admin opens the stack and the destination's dead letters, starts
  //    the receiver, and replays one from the keyboard.
  await page.getByRole('button', { name: 'Sign out' }).click()
  await page.waitForURL(/\/console\/sign-in/)
  await signIn(page, adminToken)
  await page.getByRole('link', { name: 'Stack', exact: true }).click()
  await page.waitForURL(/\/console\/stack$/)
  await shot(page, 'stack')
  const phoneOverflow = async (name) => {
    await page.setViewportSize({ width: 390, height: 844 })
    await shot(page, name)
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth)
    await page.setViewportSize({ width: 1280, height: 900 })
    return overflow
  }
  const stackPhoneOverflow = await phoneOverflow('stack-phone')
  await page.locator('#delivery-health').getByRole('link', { name: destination, exact: true }).click()
  await page.waitForURL(/\/console\/stack\/destinations\//)
  const rows = page.locator('#dead-letter-list tbody tr')
  const letterIds = () => rows.evaluateAll((found) => found.map((row) => Number(row.id.replace('dead-letter-', ''))))
  seen.stack = { before: await letterIds(), adminLetters: await rows.allInnerTexts() }
  await shot(page, 'dead-letters')
  seen.stack.phoneOverflow = { stack: stackPhoneOverflow, deadLetters: await phoneOverflow('dead-letters-phone') }
  const received = []
  const receiver = http.createServer((request, response) => {
    let body = ''
    request.on('data', (chunk) => { body += chunk })
    request.on('end', () => {
      received.push(body)
      response.writeHead(200)
      response.end('ok')
    })
  })
  await new Promise((resolve) => receiver.listen(receiverPort, '127.0.0.1', resolve))
  try {
    const replayed = seen.stack.before[0]
    seen.stack.replayed = replayed
    await page.getByRole('button', { name: `Replay item ${replayed}` }).focus()
    await Promise.all([page.waitForURL(/replayed=1/), page.keyboard.press('Enter')])
    seen.stack.notice = await page.locator('#replayed').innerText()
    seen.stack.after = await letterIds()
    await shot(page, 'dead-letter-replayed')
    for (let attempt = 0; attempt < 100 && received.length === 0; attempt += 1) {
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
    seen.stack.received = received
  } finally {
    receiver.close()
  }
  await page.goto(base + '/console/governance/audit?action=destination.replay')
  seen.stack.auditText = await page.locator('#audit-list').innerText()
  await shot(page, 'audit-log')
  seen.stack.phoneOverflow.audit = await phoneOverflow('audit-log-phone')
  await page.goto(base + '/console/quality')
  await shot(page, 'data-quality')
  seen.stack.phoneOverflow.quality = await phoneOverflow('data-quality-phone')
  seen.scriptErrors = failures
  console.log(JSON.stringify(seen))
} catch (error) {
  console.error(error.stack ?? String(error))
  console.error(JSON.stringify(seen))
  process.exitCode = 1
} finally {
  await browser.close()
}
