% rebase('base.tpl', title=title, session=session)
<p class="error">{{message}}</p>
<p><a href="/">Back to the jobs</a></p>
